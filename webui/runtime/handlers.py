"""Job handlers: the registry from request type to the function the worker runs for it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from webui.generation.hires import HiresTools
from webui.generation.runner import RunOptions, run_txt2img
from webui.generation.upscale_job import run_upscale_job, upscale_settings, upscaler_entries
from webui.models.embeddings import prompt_warnings
from webui.models.manager import merge_lora_refs
from webui.prompt.parser import extract_lora_tags
from webui.types import GenerationRequest, LoadModelRequest, UpscaleRequest

if TYPE_CHECKING:
    from webui.context import AppContext
    from webui.runtime.worker import Job, JobControl


def _run_options(ctx: "AppContext") -> RunOptions:
    outdir = ctx.options.get("outdir_samples") or ""
    return RunOptions(
        outdir=Path(outdir) if outdir else ctx.settings.outdir,
        filename_pattern=ctx.options.get("samples_filename_pattern"),
        save=bool(ctx.options.get("samples_save")),
        previews=bool(ctx.options.get("live_previews_enable")),
        preview_every=int(ctx.options.get("show_progress_every_n_steps")),
        plugins=ctx.plugins,
    )


def build_handlers(ctx: "AppContext") -> dict[type, Callable[["Job", "JobControl"], Any]]:
    def generate(job: "Job", control: "JobControl"):
        request: GenerationRequest = job.request
        control.update(text=f"loading {request.checkpoint}")
        model = ctx.manager.ensure(request.checkpoint, request.vae)
        loras = merge_lora_refs(request.loras, extract_lora_tags(request.prompt)[1])
        if loras or model.patcher is not None:
            control.update(text=f"applying {len(loras)} LoRA(s)")
        applied = ctx.manager.apply_loras(model, loras)
        if loras and ctx.lora_library is not None:
            ctx.lora_library.record_use(ref.name for ref in loras)  # LoRA browser: most/recently used
        skipped = prompt_warnings(model.embeddings, request.prompt, request.negative_prompt)
        if skipped:
            applied = replace(applied, warnings=applied.warnings + skipped)
        options = _run_options(ctx)
        if request.enable_hr:
            options = replace(options, hires=HiresTools(upscaler_entries(ctx), ctx.cache, upscale_settings(ctx)))
        return run_txt2img(model, request, control, options, loras=applied)

    def load_model(job: "Job", control: "JobControl"):
        request: LoadModelRequest = job.request
        control.update(text=f"loading {request.checkpoint}")
        model = ctx.manager.ensure(request.checkpoint, request.vae)
        return {"checkpoint": model.name, "vae": model.vae_name, "seconds": model.load_seconds,
                "cache_hit": model.cache_hit}

    def upscale(job: "Job", control: "JobControl"):
        return run_upscale_job(ctx, job.request, control, _run_options(ctx))

    return {GenerationRequest: generate, LoadModelRequest: load_model, UpscaleRequest: upscale}
