"""ModelManager: make a (checkpoint, VAE) pair the loaded model, from the RAM cache when possible.

Runs on the worker thread only.  Components are cached by file identity (path, size, mtime) in the
byte-budgeted ``ComponentCache``; switching back to a recently used checkpoint is a cache hit and costs a
pipeline rebuild (no tensor copies).  On CUDA the cached modules themselves are moved: the active model's
to the device, the previous one's back to the CPU (LoRA patches restored first), so the cache budget is RAM
and only one model sits in VRAM.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from webui.models import loaders
from webui.models.cache import ComponentCache, module_bytes
from webui.models.catalog import Catalog, ModelRecord
from webui.runtime.device import DevicePlan, plan_device
from webui.settings import Settings
from webui.types import Arch, LoraRef, ModelKind, Prediction

log = logging.getLogger(__name__)

AUTOMATIC_VAE = "Automatic"
NO_VAE = ("", "None", AUTOMATIC_VAE, None)


class ModelUnavailable(ValueError):
    """The chosen model cannot be used; the message names the file, the problem and what to do."""


@dataclass
class LoadedModel:
    record: ModelRecord
    components: Any  # loaders.CheckpointComponents
    pipe: Any  # diffusers pipeline
    encoder: Any  # webui.prompt.encode.PromptEncoder
    vae_record: ModelRecord | None
    model_hash: str | None
    load_seconds: float
    cache_hit: bool
    patcher: Any = None  # webui.models.lora.LoraPatcher, created on first LoRA use
    embeddings: Any = None  # webui.models.embeddings.EmbeddingState of its text encoder(s)
    task_pipes: dict = dataclasses.field(default_factory=dict)  # webui.generation.pipeline_tasks views

    @property
    def arch(self) -> Arch:
        return self.components.arch

    @property
    def prediction(self) -> Prediction:
        return self.components.prediction

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def vae_name(self) -> str:
        return self.vae_record.name if self.vae_record else AUTOMATIC_VAE


def _file_key(kind: str, record: ModelRecord) -> tuple:
    return (kind, str(record.path), record.size, record.mtime)


def _components_bytes(components: Any) -> int:
    total = 0
    for field in dataclasses.fields(components):
        value = getattr(components, field.name)
        if isinstance(value, torch.nn.Module):
            total += module_bytes(value)
    return total


@dataclass(frozen=True)
class LoraApplication:
    """What a LoRA stack did to the loaded model, for infotext and the user."""

    hashes: dict[str, str]  # name -> sha256[:12] (A1111 "Lora hashes")
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    matched: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # file -> (matched, total) layers


def merge_lora_refs(slots: Sequence[LoraRef], tags: Sequence[LoraRef]) -> tuple[LoraRef, ...]:
    """UI slots and ``<lora:>`` tags are two views of one list: a tag overrides a slot of the same name."""
    merged = {ref.name: ref for ref in slots}
    merged.update({ref.name: ref for ref in tags})
    return tuple(merged.values())


class ModelManager:
    def __init__(self, *, catalog: Catalog, cache: ComponentCache, settings: Settings, plan: DevicePlan | None = None,
                 option: Any = None):
        self._option = option  # OptionsStore.get (memory_mode, memory_headroom_mb); None: defaults
        self._catalog = catalog
        self._cache = cache
        self._settings = settings
        self.plan = plan or plan_device(settings.device, settings.precision)
        self.current: LoadedModel | None = None
        self.memory_mode = "cpu"  # how the current model sits on the accelerator (webui.runtime.memory)
        self._current_key: tuple | None = None
        from webui.models.embeddings import EmbeddingLoader

        self._embedding_loader = EmbeddingLoader()

    # ---- lookups --------------------------------------------------------------------------
    def _checkpoint_record(self, name: str) -> ModelRecord:
        try:
            record = self._catalog.get(ModelKind.CHECKPOINT.value, name)
        except LookupError as exc:
            raise ModelUnavailable(str(exc)) from None
        if record.error:
            raise ModelUnavailable(f"{record.path}: {record.error}")
        if record.format == "pickle" and not self._settings.allow_pickle:
            raise ModelUnavailable(
                f"{record.path}: .ckpt/.pt files can run code when loaded. Convert it to .safetensors, "
                "or restart with --allow-pickle to load it with torch.load(weights_only=True)."
            )
        return record

    def _vae_record(self, name: str | None) -> ModelRecord | None:
        if name in NO_VAE:
            return None
        try:
            record = self._catalog.get(ModelKind.VAE.value, name)
        except LookupError as exc:
            raise ModelUnavailable(str(exc)) from None
        if record.error:
            raise ModelUnavailable(f"{record.path}: {record.error}")
        return record

    # ---- loading --------------------------------------------------------------------------
    def _checkpoint_components(self, record: ModelRecord, storage: str = "") -> tuple[Any, bool]:
        key = (*_file_key("checkpoint", record), storage)
        cached = self._cache.get(key)
        if cached is not None:
            return cached, True
        try:
            components = loaders.load_checkpoint(
                record.path,
                arch=record.arch,
                variant=record.variant,
                prediction=record.prediction,
                dtype=self.plan.dtype,
                allow_pickle=self._settings.allow_pickle,
            )
        except loaders.ModelLoadError as exc:
            raise ModelUnavailable(str(exc)) from None
        from webui.runtime.memory import store_weights

        store_weights(components.unet, storage, self.plan.dtype)
        self._cache.put(key, components, _components_bytes(components))
        return components, False

    def _vae_module(self, record: ModelRecord, arch: Arch) -> Any:
        key = _file_key("vae", record)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        try:
            vae = loaders.load_vae(record.path, arch=arch, dtype=self.plan.dtype, allow_pickle=self._settings.allow_pickle)
        except loaders.ModelLoadError as exc:
            raise ModelUnavailable(str(exc)) from None
        self._cache.put(key, vae, module_bytes(vae))
        return vae

    def ensure(self, checkpoint: str, vae: str | None = None) -> LoadedModel:
        """Return the loaded model for this (checkpoint, VAE), loading/swapping only what differs."""
        record = self._checkpoint_record(checkpoint)
        vae_record = self._vae_record(vae)
        storage = self.weight_storage(record)
        key = (_file_key("checkpoint", record), _file_key("vae", vae_record) if vae_record else None, storage)
        if record.arch in _DIT_ARCHES:  # Flux / SD3 / Qwen-Image: webui.models.dit
            return _ensure_dit(self, record, vae_record, key)
        if self.current is not None and self._current_key == key:
            return self._sync_embeddings(self.current)
        started = time.perf_counter()
        estimate = self._check_memory(record, vae_record)
        components, hit = self._checkpoint_components(record, storage)
        vae_module = self._vae_module(vae_record, components.arch) if vae_record is not None else None
        self._move_current_off_device()
        pipe = loaders.build_pipeline(components, vae=vae_module)
        self._place(pipe, estimate)
        pipe.set_progress_bar_config(disable=True)
        from webui.prompt.encode import PromptEncoder

        encoder = PromptEncoder.from_pipeline(pipe, components.arch)
        model_hash = self._catalog.sha256(record)[:10] if record.format != "diffusers" else None
        self.current = LoadedModel(
            record=record,
            components=components,
            pipe=pipe,
            encoder=encoder,
            vae_record=vae_record,
            model_hash=model_hash,
            load_seconds=time.perf_counter() - started,
            cache_hit=hit,
        )
        self._current_key = key
        log.info("model ready: %s (vae %s) in %.2fs%s", record.name, self.current.vae_name,
                 self.current.load_seconds, " [RAM cache]" if hit else "")
        return self._sync_embeddings(self.current)

    def _sync_embeddings(self, model: LoadedModel) -> LoadedModel:
        """Textual inversions from models/embeddings: added once per (text encoder, file); misfits skipped."""
        try:
            records = self._catalog.list(ModelKind.EMBEDDING.value)
        except (KeyError, LookupError):
            records = []
        model.embeddings = self._embedding_loader.sync(model.pipe, model.components, records)
        return model

    # ---- LoRA ----------------------------------------------------------------------------
    def _lora(self, ref: LoraRef) -> Any:
        from webui.models.lora import load_lora

        try:
            record = self._catalog.get(ModelKind.LORA.value, ref.name)
        except LookupError as exc:
            raise ModelUnavailable(f"LoRA {ref.name!r}: {exc}") from None
        if record.error:
            raise ModelUnavailable(f"{record.path}: {record.error}")
        key = _file_key("lora", record)
        lora = self._cache.get(key)
        if lora is None:
            lora = load_lora(record.path, name=record.name, sha256=self._catalog.sha256(record),
                             allow_pickle=self._settings.allow_pickle)
            self._cache.put(key, lora, lora.nbytes)
        return lora

    def apply_loras(self, model: LoadedModel, refs: Sequence[LoraRef]) -> LoraApplication:
        """Merge exactly this LoRA stack into ``model`` (restoring layers a previous stack touched)."""
        from webui.models.lora import LoraPatcher, StackEntry

        if not refs and model.patcher is None:
            return LoraApplication(hashes={})
        entries = [StackEntry(self._lora(ref), ref.weight, ref.te_weight, ref.block_weights) for ref in refs]
        if model.patcher is None:
            pipe = model.pipe
            modules = {"unet": getattr(pipe, "unet", None), "transformer": getattr(pipe, "transformer", None),
                       "te1": getattr(pipe, "text_encoder", None), "te2": getattr(pipe, "text_encoder_2", None),
                       "te3": getattr(pipe, "text_encoder_3", None)}
            model.patcher = LoraPatcher({k: v for k, v in modules.items() if v is not None}, arch=model.arch)
        report = model.patcher.apply(entries)
        hashes = {e.lora.name.split("/")[-1]: (e.lora.sha256 or "")[:12] for e in entries}
        warnings = tuple(report.warnings) + tuple(w for e in entries for w in e.lora.warnings)
        matched = {m.lora: (len(m.matched), m.total) for m in report.matches}
        return LoraApplication(hashes=hashes, warnings=warnings, seconds=report.seconds, matched=matched)

    # ---- memory ---------------------------------------------------------------------------
    def estimate(self, record: ModelRecord, vae_record: ModelRecord | None = None) -> Any:
        """What loading ``record`` needs (``webui.runtime.memory.MemoryEstimate``), from file sizes only: any
        thread may ask (the models bar shows it before a load)."""
        from webui.runtime import memory

        from webui.models.dit.assemble import split_part_records

        sizes = {str(record.path): record.size}
        if vae_record is not None:
            sizes[str(vae_record.path)] = vae_record.size
        for part in split_part_records(record, self._catalog, with_vae=vae_record is None):  # DiT split layout
            sizes[str(part.path)] = part.size
        return memory.estimate_from_files(record.name, sizes, run_dtype_bytes=self.plan.dtype.itemsize)

    def _check_memory(self, record: ModelRecord, vae_record: ModelRecord | None) -> Any:
        """Estimate before loading (webui.runtime.memory); refuse with a message when it cannot fit."""
        from webui.runtime import memory

        estimate = self.estimate(record, vae_record)
        cached = (*_file_key("checkpoint", record), self.weight_storage(record)) in self._cache
        free_host = _free_host_bytes() + self._cache.stats().bytes  # the cache gives way to a new model
        try:
            memory.choose_mode(estimate, self._memory_option("memory_mode", "auto"),
                               free_accelerator=self._free_accelerator(), free_host=free_host if not cached
                               else estimate.host_need(), headroom=self._headroom())
        except memory.MemoryRefused as exc:
            raise ModelUnavailable(str(exc)) from None
        return estimate

    def _place(self, pipe: Any, estimate: Any) -> None:
        from webui.runtime import memory

        free = self._free_accelerator()
        mode = memory.choose_mode(estimate, self._memory_option("memory_mode", "auto"), free_accelerator=free,
                                  free_host=estimate.host_need(), headroom=self._headroom())
        memory.apply_memory_mode(pipe, mode, self.plan.device)
        self.memory_mode = mode if free is not None else "cpu"
        log.info("%s (%s)", estimate.describe(), self.memory_mode)

    def weight_storage(self, record: ModelRecord) -> str:
        """``"fp8"`` when the fp8_storage option applies to this checkpoint's family (webui.runtime.memory)."""
        from webui.runtime.memory import weight_storage

        return weight_storage(self._memory_option("fp8_storage", "Disable"), record.arch)

    def _memory_option(self, key: str, default: Any) -> Any:
        return self._option(key) if self._option is not None else default

    def _headroom(self) -> int:
        return int(self._memory_option("memory_headroom_mb", 512)) * 1024 * 1024

    def _free_accelerator(self) -> int | None:
        if not self.plan.is_cuda:
            return None
        free, _total = torch.cuda.mem_get_info(self.plan.device)
        return free

    def _move_current_off_device(self) -> None:
        if self.current is None:
            return
        if self.current.patcher is not None:  # cached components must stay pristine
            self.current.patcher.restore()
        if self.plan.device.type != "cpu":
            from webui.runtime.memory import release

            release(self.current.pipe)
            self.current.pipe.to("cpu")
            torch.cuda.empty_cache() if self.plan.is_cuda else None
        self.current = None
        self._current_key = None

    def unload(self) -> None:
        self._move_current_off_device()

    def memory(self) -> dict[str, Any]:
        stats = self._cache.stats()
        info: dict[str, Any] = {"cache": stats, "device": self.plan.describe()}
        if self.plan.is_cuda:
            free, total = torch.cuda.mem_get_info(self.plan.device)
            info["cuda"] = {"free": free, "total": total, "allocated": torch.cuda.memory_allocated(self.plan.device)}
        return info


# ---- DiT families (Flux.1, SD3/3.5, Qwen-Image): loading branch of ModelManager.ensure -------------------
_DIT_ARCHES = frozenset({Arch.FLUX, Arch.SD3, Arch.QWEN_IMAGE})


def _ensure_dit(manager: ModelManager, record: ModelRecord, vae_record: ModelRecord | None, key: tuple) -> LoadedModel:
    """Load (or take from the RAM cache) a DiT model and make it current; no textual inversions for DiTs."""
    from webui.models.dit.assemble import load_dit
    from webui.models.dit.components import DitLoadError, build_dit_pipeline

    if manager.current is not None and manager._current_key == key:
        return manager.current
    started = time.perf_counter()
    estimate = manager._check_memory(record, vae_record)
    try:
        components, vae_module, hit = load_dit(record, catalog=manager._catalog, cache=manager._cache,
                                               vae_record=vae_record, dtype=manager.plan.dtype,
                                               allow_pickle=manager._settings.allow_pickle, storage=key[-1])
        manager._move_current_off_device()
        pipe = build_dit_pipeline(components, vae=vae_module)
    except DitLoadError as exc:
        raise ModelUnavailable(str(exc)) from None
    manager._place(pipe, estimate)
    pipe.set_progress_bar_config(disable=True)
    manager.current = LoadedModel(
        record=record, components=components, pipe=pipe, encoder=_dit_encoder(pipe, components.arch),
        vae_record=vae_record, model_hash=manager._catalog.sha256(record)[:10] if record.format != "diffusers" else None,
        load_seconds=time.perf_counter() - started, cache_hit=hit)
    manager._current_key = key
    log.info("model ready: %s (%s, vae %s) in %.2fs%s", record.name, components.family, manager.current.vae_name,
             manager.current.load_seconds, " [RAM cache]" if hit else "")
    return manager.current


def _free_host_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _dit_encoder(pipe: Any, arch: Arch) -> Any:
    from webui.prompt.dit_encode import DitPromptEncoder

    return DitPromptEncoder.from_pipeline(pipe, arch)
