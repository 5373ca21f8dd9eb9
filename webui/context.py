"""AppContext: the only long-lived mutable state, and the facade the UI, the API and plugins use.

Built once by ``webui.app`` (or by tests) with ``AppContext.create(settings)``; passed explicitly to every
tab and route.  Everything that touches torch runs on ``worker``; the methods here only submit jobs,
read the catalog and the options store.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from webui.lora_library import LoraLibrary
from webui.models.cache import ComponentCache
from webui.models.catalog import Catalog, ModelRecord
from webui.models.starter_downloads import StarterDownloads
from webui.models.manager import ModelManager
from webui.options import OptionError, OptionsStore
from webui.plugins.manager import from_settings as plugins_from_settings
from webui.runtime.handlers import build_handlers
from webui.runtime.worker import Job, Worker
from webui.settings import Settings
from webui.image_requests import Img2ImgRequest
from webui.types import GenerationRequest, JobState, LoadModelRequest, ModelKind, RequestError, Variant

log = logging.getLogger(__name__)

AUTOMATIC_VAE = "Automatic"


@dataclass
class AppContext:
    settings: Settings
    options: OptionsStore
    catalog: Catalog
    cache: ComponentCache
    manager: ModelManager
    worker: Worker
    downloads: StarterDownloads
    messages: list[str] = field(default_factory=list)  # start-up notes shown in the UI (empty models/, ...)
    plugins: Any = None  # webui.plugins.manager.PluginManager (extensions), set by create()
    lora_library: Any = None  # webui.lora_library.LoraLibrary (LoRA browser: index, bookmarks, usage), set by create()
    samplers: Any = None  # webui.generation.samplers.SamplerRegistry (built-in + extension samplers), set by create()
    controlnets: Any = None  # webui.models.controlnet.ControlNetLoader, set by create()
    preprocessors: Any = None  # webui.generation.preprocessors registry (built-in + extension), set by create()
    ip_adapters: Any = None  # webui.models.ip_adapter.IpAdapterLoader, set by create()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, settings: Settings, *, start_worker: bool = True) -> "AppContext":
        for folder in settings.model_dirs().values():
            folder.mkdir(parents=True, exist_ok=True)
        settings.outdir.mkdir(parents=True, exist_ok=True)
        options = OptionsStore(settings.config_file)
        catalog = Catalog.from_settings(settings)
        catalog.refresh()
        cache = ComponentCache(int(options.get("sd_checkpoint_cache_mb")) * 1024 * 1024)
        manager = ModelManager(catalog=catalog, cache=cache, settings=settings, option=options.get)
        ctx = cls(
            settings=settings,
            options=options,
            catalog=catalog,
            cache=cache,
            manager=manager,
            worker=Worker({}),
            downloads=StarterDownloads(settings.ckpt_dir, on_done=lambda _path: catalog.refresh("checkpoint")),
            messages=list(options.load_warnings),
        )
        ctx.plugins = plugins_from_settings(settings, options.get).load()
        from webui.generation.samplers import SamplerRegistry  # built-in + extension samplers/schedule types
        ctx.samplers = SamplerRegistry.from_plugins(ctx.plugins)
        from webui.generation.preprocessors import PreprocessorRegistry
        from webui.models.controlnet import ControlNetLoader

        ctx.controlnets = ControlNetLoader(catalog, cache, manager.plan, allow_pickle=settings.allow_pickle)
        ctx.preprocessors = PreprocessorRegistry.from_plugins(ctx.plugins, cache=cache)
        from webui.models.ip_adapter import IpAdapterLoader

        ctx.ip_adapters = IpAdapterLoader(catalog, cache, manager.plan)
        ctx.lora_library = LoraLibrary.from_settings(settings, catalog.roots("lora"))  # scans lazily
        ctx.messages.extend(options.add_specs(ctx.plugins.option_specs()))
        for request_type, handler in build_handlers(ctx).items():
            ctx.worker.register(request_type, handler)
        if start_worker:
            ctx.worker.start()
        return ctx

    def close(self) -> None:
        self.worker.stop()
        if self.lora_library is not None:
            self.lora_library.close()

    # ---- models ---------------------------------------------------------------------------
    def checkpoints(self) -> list[ModelRecord]:
        return self.catalog.list(ModelKind.CHECKPOINT.value)

    def usable_checkpoints(self) -> list[ModelRecord]:
        return [r for r in self.checkpoints() if r.error is None]

    def vaes(self) -> list[ModelRecord]:
        return self.catalog.list(ModelKind.VAE.value)

    def selected_checkpoint(self) -> str | None:
        """The checkpoint new jobs use when they name none: the option, else the first usable file."""
        chosen = self.options.get("sd_model_checkpoint")
        if chosen:
            return chosen
        usable = self.usable_checkpoints()
        return usable[0].name if usable else None

    def refresh_models(self, kind: str | None = None) -> None:
        self.catalog.refresh(kind)

    def empty_models_message(self) -> str | None:
        if self.usable_checkpoints():
            return None
        s = self.settings
        return (
            "No checkpoint found. Put a Stable Diffusion checkpoint (.safetensors: SD 1.5, SD 2.x, SDXL, "
            f"Pony, Illustrious, NoobAI, SD3.5...) or a diffusers folder into {s.ckpt_dir} and press Refresh. "
            "Other files go to: "
            f"VAE -> {s.vae_dir}, LoRA -> {s.lora_dir}, embeddings -> {s.embeddings_dir}, "
            f"upscalers -> {s.esrgan_dir}, ControlNet -> {s.controlnet_dir}, IP-Adapter -> {s.ipadapter_dir} "
            f"(image encoders -> {s.clip_vision_dir}); Flux/Chroma/SD3.5/Qwen-Image transformer-only files "
            f"(.safetensors or .gguf) -> {s.unet_dir} with their text encoders in {s.text_encoders_dir}. "
            "Or use 'Download a starter model', or restart with --demo for tiny noise-making demo models."
        )

    # ---- jobs -----------------------------------------------------------------------------
    def resolve_request(self, request: GenerationRequest) -> GenerationRequest:
        """Fill in "current" choices at submit time so that a job describes exactly what it runs."""
        from webui.generation.samplers import resolve as resolve_sampler

        resolve_sampler(request.sampler, request.schedule, self.samplers)  # RequestError now
        changes: dict[str, Any] = {}
        if request.checkpoint is None:
            checkpoint = self.selected_checkpoint()
            if checkpoint is None:
                raise RequestError(self.empty_models_message())
            changes["checkpoint"] = checkpoint
        if request.vae is None:
            changes["vae"] = self.options.get("sd_vae") or AUTOMATIC_VAE
        request = request.with_changes(**changes) if changes else request
        if isinstance(request, Img2ImgRequest):
            self._check_img2img(request)
        return self.plugins.modify_request(request) if self.plugins is not None else request

    def _check_img2img(self, request: Img2ImgRequest) -> None:
        """What can be known before the job runs (a 422 in the API instead of a failed job)."""
        from webui.generation.img2img import steps_to_run

        try:
            record = self.catalog.get(ModelKind.CHECKPOINT.value, request.checkpoint)
        except LookupError:
            return  # the job reports the missing checkpoint with its suggestions
        if record.variant is not Variant.INSTRUCT_PIX2PIX:
            steps_to_run(request)

    def submit(self, request: Any, *, client: str | None = None) -> Job:
        if isinstance(request, GenerationRequest):
            request = self.resolve_request(request)
        return self.worker.submit(request, client=client)

    def run(self, request: Any, *, client: str | None = None, timeout: float | None = None) -> Job:
        job = self.submit(request, client=client)
        job.wait(timeout)
        return job

    # ---- options --------------------------------------------------------------------------
    def set_options(self, changes: Mapping[str, Any], *, timeout: float | None = 600) -> dict[str, Any]:
        """Validate and save options; switching checkpoint/VAE loads it on the worker first.

        Raises OptionError (bad value) or RequestError (model could not be loaded); nothing is saved then.
        """
        clean = self.options.validate(changes)
        if "sd_model_checkpoint" in clean or "sd_vae" in clean:
            checkpoint = clean.get("sd_model_checkpoint") or self.selected_checkpoint()
            vae = clean.get("sd_vae", self.options.get("sd_vae")) or AUTOMATIC_VAE
            if checkpoint:
                try:
                    record = self.catalog.get(ModelKind.CHECKPOINT.value, checkpoint)
                except LookupError as exc:
                    raise OptionError(str(exc)) from None
                if "sd_model_checkpoint" in clean:
                    clean["sd_model_checkpoint"] = record.name
                job = self.run(LoadModelRequest(checkpoint=record.name, vae=vae), timeout=timeout)
                if job.state is not JobState.DONE:
                    raise RequestError(job.error or f"loading {record.name} did not finish")
        return self.options.update(clean)
