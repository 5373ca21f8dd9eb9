"""Job handlers: the registry from request type to the function the worker runs for it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from webui.types import GenerationRequest, LoadModelRequest, UpscaleRequest

if TYPE_CHECKING:
    from webui.context import AppContext
    from webui.runtime.worker import Job, JobControl


def _run_options(ctx: "AppContext"):
    from webui.generation.runner import RunOptions

    outdir = ctx.options.get("outdir_samples") or ""
    return RunOptions(
        outdir=Path(outdir) if outdir else ctx.settings.outdir,
        filename_pattern=ctx.options.get("samples_filename_pattern"),
        save=bool(ctx.options.get("samples_save")),
        previews=bool(ctx.options.get("live_previews_enable")),
        preview_every=int(ctx.options.get("show_progress_every_n_steps")),
    )


def build_handlers(ctx: "AppContext") -> dict[type, Callable[["Job", "JobControl"], Any]]:
    def generate(job: "Job", control: "JobControl"):
        from webui.generation.runner import run_txt2img
        from webui.models.manager import merge_lora_refs
        from webui.prompt.parser import extract_lora_tags

        request: GenerationRequest = job.request
        control.update(text=f"loading {request.checkpoint}")
        model = ctx.manager.ensure(request.checkpoint, request.vae)
        loras = merge_lora_refs(request.loras, extract_lora_tags(request.prompt)[1])
        if loras or model.patcher is not None:
            control.update(text=f"applying {len(loras)} LoRA(s)")
        applied = ctx.manager.apply_loras(model, loras)
        return run_txt2img(model, request, control, _run_options(ctx), loras=applied)

    def load_model(job: "Job", control: "JobControl"):
        request: LoadModelRequest = job.request
        control.update(text=f"loading {request.checkpoint}")
        model = ctx.manager.ensure(request.checkpoint, request.vae)
        return {"checkpoint": model.name, "vae": model.vae_name, "seconds": model.load_seconds,
                "cache_hit": model.cache_hit}

    def upscale(job: "Job", control: "JobControl"):
        from webui.generation.upscale_job import run_upscale_job

        return run_upscale_job(ctx, job.request, control, _run_options(ctx))

    return {GenerationRequest: generate, LoadModelRequest: load_model, UpscaleRequest: upscale}
