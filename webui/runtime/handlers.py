"""Job handlers: the registry from request type to the function the worker runs for it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from webui.generation.adapter_control import job_notes
from webui.generation.hires import HiresTools
from webui.generation.runner import RunOptions, run_generation, txt2img_plan
from webui.generation.upscale_job import run_upscale_job, upscale_settings, upscaler_entries
from webui.models.embeddings import prompt_warnings
from webui.models.manager import merge_lora_refs
from webui.prompt.parser import extract_lora_tags
from webui.prompt.dit_encode import DIT_ARCHES, prompt_notes
from webui.image_requests import Img2ImgRequest
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
        samplers=getattr(ctx, "samplers", None),
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
        plan, notes = _plan(ctx, model, request, control)
        if notes:
            applied = replace(applied, warnings=tuple(applied.warnings) + tuple(notes))
        attachment = None
        if request.ip_adapters:
            control.update(text=f"reference images: {len(request.ip_adapters)} IP-Adapter(s)")
            attachment = ctx.ip_adapters.attach(plan.pipe, request.ip_adapters, base_arch=model.arch,
                                                num_images_per_prompt=request.batch_size,
                                                do_cfg=request.cfg_scale > 1.0)
            plan = replace(plan, call_kwargs={**plan.call_kwargs, **attachment.kwargs},
                           infotext={**plan.infotext, **attachment.infotext})
        try:
            result = run_generation(model, request, control, options, plan, loras=applied)
        finally:
            if attachment is not None:
                attachment.detach()
        return result

    def load_model(job: "Job", control: "JobControl"):
        request: LoadModelRequest = job.request
        control.update(text=f"loading {request.checkpoint}")
        model = ctx.manager.ensure(request.checkpoint, request.vae)
        return {"checkpoint": model.name, "vae": model.vae_name, "seconds": model.load_seconds,
                "cache_hit": model.cache_hit, "memory_mode": ctx.manager.memory_mode}

    def upscale(job: "Job", control: "JobControl"):
        return run_upscale_job(ctx, job.request, control, _run_options(ctx))

    return {GenerationRequest: generate, Img2ImgRequest: generate, LoadModelRequest: load_model,
            UpscaleRequest: upscale}


def _plan(ctx: "AppContext", model: Any, request: GenerationRequest, control: "JobControl") -> tuple[Any, list[str]]:
    """The SamplingPlan for this model family and request type, and notes for the user."""
    if model.arch in DIT_ARCHES:  # SD3 / Flux / Qwen-Image (webui.generation.dit)
        from webui.generation.dit import build_dit_plan

        notes = prompt_notes(model.arch, request.prompt, request.negative_prompt, request.steps,
                             pipeline=str(getattr(model.components, "pipeline_class", "")))
        if request.sampler == "Euler a":
            notes.append("sampler 'Euler a' is sampled with the flow-matching Euler sampler on this model")
        return build_dit_plan(model, request), notes
    control_for = _control_for(ctx, model, request, control) if request.controlnet else None
    if isinstance(request, Img2ImgRequest):
        from webui.generation.img2img import build_plan

        return build_plan(model, request, control_for), []
    cond = control_for(None) if control_for else None
    notes = job_notes(cond, request)  # T2I-Adapter units: what runs differently
    return txt2img_plan(model, request, cond), notes


def _control_for(ctx: "AppContext", model: Any, request: GenerationRequest, control: "JobControl"):
    """(init image or None) -> ControlConditioning for this job's ControlNet units (None: all disabled)."""
    from webui.generation.control import prepare_control

    def prepare(init_image: Any):
        control.update(text=f"ControlNet: preparing {len(request.controlnet)} unit(s)")
        return prepare_control(request.controlnet, base_arch=model.arch, width=request.width, height=request.height,
                               init_image=init_image, loader=ctx.controlnets, preprocessors=ctx.preprocessors,
                               annotators_dir=ctx.settings.controlnet_dir / "annotators",
                               do_cfg=request.cfg_scale > 1.0)

    return prepare
