"""sd-webui-controlnet's HTTP routes, for the clients that speak them (Krita/Photoshop plugins, webuiapi, bots).

``GET /controlnet/version``, ``/model_list``, ``/module_list``, ``/settings`` and ``POST /controlnet/detect``
(run a preprocessor).  Mounted with ``/sdapi/v1`` (``--api`` / ``--nowebui``), same login and body limit.
Units themselves travel in ``alwayson_scripts`` of txt2img/img2img (``controlnet_units``); this module also
checks their model and module names against the catalog and the preprocessor registry at submit time, so
a typo is a 422, not a failed job.

Model names are ``"<name> [<hash8>]"`` with A1111's old short hash (sha256 of 64 KiB at offset 1 MiB),
which is what sd-webui-controlnet shows and what clients send back; the hash is stripped on the way in.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query

from webui.api.controlnet_units import decode_input_image
from webui.api.images import encode_png_b64
from webui.api.routing import Waiter
from webui.api.schemas import ControlNetDetectRequest, ControlNetDetectResponse
from webui.models.controlnet import legacy_hash
from webui.types import ModelKind, RequestError

PREFIX = "/controlnet"
API_VERSION = 2
PREPROCESS_THREADS = 2  # /detect is CPU work: at most this many at once, off the event loop
IP_ADAPTER_KIND = ModelKind.IP_ADAPTER.value
RESOLUTION_SLIDER = {"name": "Preprocessor Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}


def _records(ctx, kind: str) -> list:
    try:
        return ctx.catalog.list(kind)
    except ValueError:  # this catalog has no such folder kind
        return []


def model_title(record) -> str:
    if record.path.is_file():
        return f"{record.name} [{legacy_hash(record.path)}]"
    return f"{record.name} [{record.sha256[:8]}]" if record.sha256 else record.name


def model_titles(ctx) -> list[str]:
    """Usable ControlNet and IP-Adapter files (sd-webui-controlnet lists both in one list)."""
    seen, titles = set(), []
    for record in _records(ctx, ModelKind.CONTROLNET.value) + _records(ctx, IP_ADAPTER_KIND):
        if record.usable and record.path not in seen:
            seen.add(record.path)
            titles.append(model_title(record))
    return titles


def ip_adapter_names(ctx) -> frozenset[str]:
    """Lower-case names/file names of IP-Adapter files (their folder, or misfiled in models/ControlNet)."""
    names = set()
    for record in _records(ctx, IP_ADAPTER_KIND) + _records(ctx, ModelKind.CONTROLNET.value):
        if record.kind is ModelKind.IP_ADAPTER or record.folder is ModelKind.IP_ADAPTER:
            names.update(n.lower() for n in (record.name, record.filename, record.relative_filename,
                                             Path(record.filename).stem))
    return frozenset(names)


# ---------------------------------------------------------------- preprocessors (webui.generation.preprocessors)
def _preprocessors():
    from webui.generation import preprocessors

    return preprocessors


def module_names() -> list[str]:
    return list(_preprocessors().preprocessor_names())


def module_detail(name: str) -> dict[str, Any]:
    """``{"model_free": bool, "sliders": [...]}`` as sd-webui-controlnet describes a module."""
    module = _preprocessors()
    describe = getattr(module, "describe_preprocessor", None)
    if describe is not None:
        return dict(describe(name))
    return {"model_free": name == "none", "sliders": [] if name == "none" else [dict(RESOLUTION_SLIDER)]}


def canonical_module(name: str, label: str) -> str:
    """The registry's spelling of a module name (any case); RequestError listing the valid names."""
    names = module_names()
    if name in names:
        return name
    folded = {n.lower(): n for n in names}
    if name.strip().lower() in folded:
        return folded[name.strip().lower()]
    raise RequestError(f"{label} {name!r} is not a ControlNet preprocessor; valid modules: {', '.join(names)} "
                       "(see /controlnet/module_list)")


def resolve_units(ctx, request):
    """Catalog names for ControlNet/IP-Adapter models and registry names for modules; 422 on a typo."""
    if not request.controlnet and not request.ip_adapters:
        return request
    units = []
    for index, unit in enumerate(request.controlnet):
        label = f"alwayson_scripts.controlnet.args[{index}]"
        try:
            record = ctx.catalog.get(ModelKind.CONTROLNET.value, unit.model)
        except LookupError as exc:
            raise RequestError(f"{label}.model: {exc} (see /controlnet/model_list)") from None
        units.append(replace(unit, model=record.name, module=canonical_module(unit.module, f"{label}.module")))
    references = []
    for index, ref in enumerate(request.ip_adapters):
        record = None
        for kind in (IP_ADAPTER_KIND, ModelKind.CONTROLNET.value):
            try:
                record = ctx.catalog.get(kind, ref.model)
                break
            except (LookupError, ValueError):
                continue
        if record is None:
            raise RequestError(f"IP-Adapter {ref.model!r} (reference images {index + 1}) was not found in "
                               "models/ipadapter or models/ControlNet; see /controlnet/model_list")
        references.append(replace(ref, model=record.name))
    return request.with_changes(controlnet=tuple(units), ip_adapters=tuple(references))


def detect_images(body: ControlNetDetectRequest, annotators_dir: Path) -> list[str]:
    """Run one preprocessor over every input image -> base64 PNG control maps (CPU; call off the event loop)."""
    if not body.controlnet_input_images:
        raise RequestError("controlnet_input_images is empty; send at least one base64 image")
    name = canonical_module(body.controlnet_module or "none", "controlnet_module")
    run = _preprocessors().run_preprocessor
    resolution = body.controlnet_processor_res if body.controlnet_processor_res and body.controlnet_processor_res > 0 \
        else RESOLUTION_SLIDER["value"]
    threshold_a = body.controlnet_threshold_a if body.controlnet_threshold_a not in (None, -1) else None
    threshold_b = body.controlnet_threshold_b if body.controlnet_threshold_b not in (None, -1) else None
    results = []
    for index, data in enumerate(body.controlnet_input_images):
        image = decode_input_image(data, f"controlnet_input_images[{index}]")
        result = run(name, image, resolution=resolution, threshold_a=threshold_a, threshold_b=threshold_b,
                     annotators_dir=annotators_dir)
        results.append(encode_png_b64(result))
    return results


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False,
                       tags=["sd-webui-controlnet compatible"])
    cpu = Waiter(threads=PREPROCESS_THREADS)

    @router.get("/version", summary="sd-webui-controlnet API version")
    def version() -> dict[str, int]:
        return {"version": API_VERSION}

    @router.get("/model_list", summary='ControlNet and IP-Adapter models, "name [hash]"')
    def model_list(update: bool = True) -> dict[str, list[str]]:
        for kind in (ModelKind.CONTROLNET.value, IP_ADAPTER_KIND) if update else ():
            try:
                ctx.refresh_models(kind)
            except ValueError:  # no such folder kind in this catalog
                pass
        return {"model_list": model_titles(ctx)}

    @router.get("/module_list", summary="Preprocessors (modules) and their sliders")
    def module_list(alias_names: bool = Query(False, description="accepted; names and aliases are the same here")):
        names = module_names()
        return {"module_list": names, "module_detail": {name: module_detail(name) for name in names}}

    @router.get("/settings", summary="ControlNet settings clients read (unit count)")
    def settings() -> dict[str, int]:
        return {"control_net_unit_count": int(ctx.options.get("control_net_unit_count"))}

    @router.post("/detect", response_model=ControlNetDetectResponse, summary="Run a preprocessor on images",
                 responses={422: {"description": "bad image or unknown module"}})
    async def detect(body: ControlNetDetectRequest):
        images = await cpu.run(detect_images, body, Path(ctx.settings.controlnet_dir) / "annotators")
        return {"images": images, "info": "Success"}

    return router
