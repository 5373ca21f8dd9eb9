"""A1111-compatible listing and settings routes: ``options``, ``sd-models``, ``sd-vae``, ``samplers``,
``schedulers``, ``upscalers``, ``loras``, ``embeddings``, ``cmd-flags``, ``memory``, ``refresh-*``, plus
the empty lists A1111 clients ask for on connect (styles, scripts, extensions...).

Checkpoint titles follow A1111: ``"<name> [<short hash>]"`` when the hash is already known (we never
hash a multi-GB file just to answer a listing), else the bare name.  Titles are accepted back
wherever a checkpoint name is (options, override_settings).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body

from webui.api import convert
from webui.api.routing import Waiter
from webui.api.schemas import (EmbeddingsResponse, LoraItem, MemoryResponse, SamplerItem, SchedulerItem,
                               SDModelItem, SDVaeItem, UpscalerItem)
from webui.generation import samplers
from webui.types import Arch, ModelKind

PREFIX = "/sdapi/v1"
UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".sft")
BUILTIN_UPSCALERS = ("None", "Lanczos", "Nearest")
SECRET_FLAGS = ("gradio_auth", "api_auth")
EMBEDDING_WIDTH_ARCH = {768: Arch.SD1, 1024: Arch.SD2}


def checkpoint_title(record) -> str:
    """A1111 title, ``"sub/name.safetensors [0123456789]"`` (no hash until the catalog knows it)."""
    return record.title


def checkpoint_item(record) -> dict[str, Any]:
    return {"title": record.title, "model_name": record.name, "hash": record.short_hash, "sha256": record.sha256,
            "filename": str(record.path), "config": None}


def embedding_item(path: Path, known_arch: Arch | None = None) -> tuple[dict[str, Any], Arch | None] | None:
    """A1111 ``EmbeddingItem`` from a safetensors header (pickled .pt files are never opened)."""
    from webui.models.detect import BrokenModelFile, read_header

    if path.suffix.lower() not in (".safetensors", ".sft"):
        return None
    try:
        header = read_header(path)
    except BrokenModelFile:
        return None
    tensors = dict(header.tensors)
    if not tensors:
        return None
    if "clip_g" in tensors:
        arch, info = Arch.SDXL, tensors["clip_g"]
    else:
        info = tensors.get("emb_params") or next(iter(tensors.values()))
        arch = EMBEDDING_WIDTH_ARCH.get(info.shape[-1]) if info.shape else None
    if known_arch is not None and known_arch is not Arch.UNKNOWN:
        arch = known_arch
    vectors = info.shape[0] if info.ndim == 2 else 1
    width = info.shape[-1] if info.shape else 0
    step = header.metadata.get("step")
    return ({"step": int(step) if step and step.isdigit() else None, "sd_checkpoint": None,
             "sd_checkpoint_name": None, "shape": int(width), "vectors": int(vectors)}, arch)


def upscaler_items(esrgan_dir: Path) -> list[dict[str, Any]]:
    items = [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
             for name in BUILTIN_UPSCALERS]
    try:
        files = sorted(p for p in Path(esrgan_dir).rglob("*") if p.suffix.lower() in UPSCALER_SUFFIXES)
    except OSError:
        files = []
    for path in files:
        scale = next((int(ch) for ch in path.stem[:2] if ch.isdigit()), 4)
        items.append({"name": path.stem, "model_name": path.stem, "model_path": str(path), "model_url": None,
                      "scale": scale})
    return items


def cmd_flags(settings) -> dict[str, Any]:
    """Every launch flag by its argparse name (A1111's ``vars(cmd_opts)``), secrets hidden."""
    from webui.settings import build_arg_parser

    by_setting = {
        "data_dir": settings.data_dir, "ckpt_dir": settings.ckpt_dir, "vae_dir": settings.vae_dir,
        "lora_dir": settings.lora_dir, "embeddings_dir": settings.embeddings_dir,
        "esrgan_models_path": settings.esrgan_dir, "controlnet_dir": settings.controlnet_dir,
        "outdir": settings.outdir, "port": settings.port, "listen": settings.host == "0.0.0.0",
        "server_name": settings.host, "share": settings.share, "api": settings.api, "nowebui": settings.nowebui,
        "insecure": settings.insecure, "allow_pickle": settings.allow_pickle, "demo": settings.demo,
        "device": settings.device, "precision": settings.precision,
        "enable_insecure_extension_access": settings.enable_insecure_extension_access,
    }
    flags: dict[str, Any] = {}
    for action in build_arg_parser()._actions:
        if action.dest == "help":
            continue
        flags[action.dest] = by_setting.get(action.dest, action.default)
    for key in SECRET_FLAGS:  # A1111 prints credentials here; we say only whether they are set
        flags[key] = "<set>" if getattr(settings, key, None) else None
    return convert.plain(flags)


def memory_stats() -> dict[str, Any]:
    try:
        import psutil

        process = psutil.Process(os.getpid())
        vm = psutil.virtual_memory()
        ram = {"free": vm.available, "used": process.memory_info().rss, "total": vm.total}
    except Exception as exc:  # psutil missing or a restricted /proc
        ram = {"error": str(exc)}
    torch = sys.modules.get("torch")  # never import torch just to answer this
    cuda: dict[str, Any] = {"error": "unavailable"}
    try:
        if torch is not None and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            cuda = {
                "system": {"free": free, "used": total - free, "total": total},
                "active": {"current": stats.get("active_bytes.all.current", 0),
                           "peak": stats.get("active_bytes.all.peak", 0)},
                "allocated": {"current": stats.get("allocated_bytes.all.current", 0),
                              "peak": stats.get("allocated_bytes.all.peak", 0)},
                "reserved": {"current": stats.get("reserved_bytes.all.current", 0),
                             "peak": stats.get("reserved_bytes.all.peak", 0)},
                "inactive": {"current": stats.get("inactive_split_bytes.all.current", 0),
                             "peak": stats.get("inactive_split_bytes.all.peak", 0)},
                "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
            }
    except Exception as exc:
        cuda = {"error": str(exc)}
    return {"ram": ram, "cuda": cuda}


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False, tags=["A1111 compatible"])

    def current_arch() -> Arch | None:
        name = ctx.selected_checkpoint()
        try:
            arch = ctx.catalog.get(ModelKind.CHECKPOINT.value, name).arch if name else None
        except LookupError:
            return None
        return None if arch is Arch.UNKNOWN else arch

    @router.get("/options", summary="All options (A1111 names)")
    def get_options() -> dict[str, Any]:
        data = ctx.options.as_dict()
        selected = ctx.selected_checkpoint()
        if selected:
            try:
                data["sd_model_checkpoint"] = checkpoint_title(ctx.catalog.get(ModelKind.CHECKPOINT.value, selected))
            except LookupError:
                data["sd_model_checkpoint"] = selected
        return convert.plain(data)

    @router.post("/options", summary="Set options; sd_model_checkpoint / sd_vae load the model first",
                 responses={422: {"description": "invalid value or unknown model; nothing is saved"}})
    async def set_options(changes: dict[str, Any] = Body(...)) -> None:
        # Titles ("name.safetensors [hash]"), names and file names all work: the catalog resolves them.
        await waiter.run(ctx.set_options, dict(changes))
        return None

    @router.get("/sd-models", response_model=list[SDModelItem])
    def sd_models():
        return [checkpoint_item(r) for r in ctx.usable_checkpoints()]

    @router.get("/sd-vae", response_model=list[SDVaeItem])
    def sd_vae():
        return [{"model_name": r.relative_filename, "filename": str(r.path)} for r in ctx.vaes() if r.usable]

    @router.get("/samplers", response_model=list[SamplerItem])
    def list_samplers():
        return samplers.describe_samplers(ctx.samplers)  # built-ins + extensions

    @router.get("/schedulers", response_model=list[SchedulerItem])
    def list_schedulers():
        return samplers.describe_schedules(ctx.samplers)

    @router.get("/upscalers", response_model=list[UpscalerItem])
    def upscalers():
        from webui.generation.upscale_job import upscaler_entries

        return [entry.as_api() for entry in upscaler_entries(ctx)]

    @router.get("/realesrgan-models")
    def realesrgan_models():
        return [{"name": i["name"], "path": i["model_path"], "scale": i["scale"]}
                for i in upscaler_items(ctx.settings.esrgan_dir) if i["model_path"]]

    @router.get("/loras", response_model=list[LoraItem])
    def loras():
        # A1111 names a LoRA by its file stem; <lora:stem:1> and <lora:sub/stem:1> both resolve.
        return [{"name": Path(r.filename).stem, "alias": Path(r.filename).stem, "path": str(r.path), "metadata": {}}
                for r in ctx.catalog.list(ModelKind.LORA.value) if r.usable]

    @router.get("/embeddings", response_model=EmbeddingsResponse)
    def embeddings():
        arch = current_arch()
        loaded, skipped = {}, {}
        for record in ctx.catalog.list(ModelKind.EMBEDDING.value):
            if not record.usable:
                continue
            found = embedding_item(Path(record.path), record.arch)
            if found is None:
                continue
            item, emb_arch = found
            name = Path(record.filename).stem
            compatible = arch is None or emb_arch is None or emb_arch == arch or (
                arch is Arch.SDXL_REFINER and emb_arch is Arch.SDXL)
            (loaded if compatible else skipped)[name] = item
        return {"loaded": loaded, "skipped": skipped}

    @router.get("/cmd-flags", summary="Launch flags (credentials are never shown)")
    def get_cmd_flags() -> dict[str, Any]:
        return cmd_flags(ctx.settings)

    @router.get("/memory", response_model=MemoryResponse)
    def memory():
        return memory_stats()

    def refresher(kind: str):
        def refresh() -> None:
            ctx.refresh_models(kind)
            return None

        return refresh

    for path, kind in (("/refresh-checkpoints", ModelKind.CHECKPOINT.value), ("/refresh-vae", ModelKind.VAE.value),
                       ("/refresh-loras", ModelKind.LORA.value), ("/refresh-embeddings", ModelKind.EMBEDDING.value)):
        router.add_api_route(path, refresher(kind), methods=["POST"], summary=f"Rescan the {kind} folder")

    from webui.generation.hires import LATENT_MODES

    router.add_api_route("/latent-upscale-modes", lambda: [{"name": name} for name in LATENT_MODES],
                         methods=["GET"], summary="Latent upscale modes for the hires fix")
    empty_lists = ("/prompt-styles", "/face-restorers", "/hypernetworks", "/script-info",
                   "/extensions")
    for path in empty_lists:
        router.add_api_route(path, lambda: [], methods=["GET"], summary="Not in this version: always empty")
    router.add_api_route("/scripts", lambda: {"txt2img": [], "img2img": []}, methods=["GET"],
                         summary="Scripts (none in this version)")

    return router
