"""Hires fix on DiT models (Flux.1 dev / schnell, Chroma, SD3 / 3.5, Qwen-Image): A1111's txt2img second pass.

``build_dit_plan`` sets ``SamplingPlan.hires = run_dit_hires`` for a txt2img job with ``enable_hr``; the runner
calls it per batch with the first pass's latents, as it calls ``webui.generation.hires.run_hires`` for SD:

1. size: ``hires.target_size`` (A1111's hr_scale / hr_resize_x / hr_resize_y rules), floored to a multiple of
   16 (``second_pass_size``: DiT latents are 2x2 patches of the 8x-downsampled image);
2. upscale, as for SD:
   * "Latent*" modes: the first-pass latents unpacked to (B, C, h, w) and interpolated
     (``hires.upscale_latents``).  The Flux, SD3 and Qwen-Image img2img pipelines take them as ``image``: their
     image processor hands a tensor with the VAE's latent channels through and ``prepare_latents`` uses it as
     the image latents (diffusers 0.42.1).  ``ChromaImg2ImgPipeline``'s image processor is built without
     ``vae_latent_channels`` and would resize such a tensor as pixels, so for Chroma the upscaled latents are
     decoded and the pipeline encodes the image again (``latents_as_image`` decides, from the pipeline);
   * image upscalers (Lanczos, Nearest, ESRGAN / Real-ESRGAN models, "None"): decode, then
     ``hires._upscale_images`` (the app's upscaler entries and model cache through ``HiresTools``);
3. the family's img2img pipeline (``pipeline_tasks``: Flux / Chroma / StableDiffusion3 / QwenImage
   ``...Img2ImgPipeline``, a view over the same components) with strength = denoising strength, the hires steps
   (or the steps), the same per-image seeds (fresh CPU generators: A1111's second-pass noise uses the seed
   again), the family's guidance, and the hires prompt / negative prompt re-encoded by the model's
   ``DitPromptEncoder`` when given;
4. a fresh flow-matching Euler scheduler of the model: a hires sampler / schedule other than Euler / Simple is
   sampled with it, with a note (``hires_notes``), as the first pass does with "Euler a".

Progress continues over both passes (step = first-pass steps + hires step).  Interrupt stops the job and drops
the interrupted batch (earlier batches are kept: the runner's rule for both passes); Skip drops this batch and
goes on with the next.  Returns (B, C, H, W) latents, which the plan's ``decode`` takes as they are.
Worker thread only.
"""
from __future__ import annotations

from typing import Any

import torch

from webui.generation.dit import (FLOW_SAMPLERS, REPEAT_CONDITIONING, decode_images, flow_scheduler,
                                  flow_steps_run, guidance_kwargs, guidance_mode, repeat_batch, vae_latents)
from webui.generation.hires import (LATENT_MODES, HiresTools, _upscale_images, second_pass_callback, steps_of,
                                   target_size, upscale_latents)
from webui.generation.pipeline_tasks import base_pipeline_class, task_pipeline
from webui.types import Arch, GenerationRequest

__all__ = ["hires_notes", "latents_as_image", "run_dit_hires", "second_pass_size"]

SIZE_MULTIPLE = 16  # 8x VAE downsampling x 2x2 latent patches (Flux / Qwen-Image packing, SD3 patch size 2)
FLOW_SCHEDULE_NAMES = ("Automatic", "Simple")


def second_pass_size(request: GenerationRequest, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """The second pass's (width, height): A1111's target size floored to ``multiple``."""
    width, height = target_size(request)
    return width // multiple * multiple, height // multiple * multiple


def latents_as_image(pipe: Any, channels: int) -> bool:
    """True when ``pipe`` takes a (B, ``channels``, h, w) latent tensor as ``image`` without treating it as
    pixels: its image processor passes tensors with the VAE's latent channel count through."""
    processor = getattr(pipe, "image_processor", None)
    return getattr(getattr(processor, "config", None), "vae_latent_channels", None) == channels


def hires_notes(model: Any, request: GenerationRequest) -> tuple[str, ...]:
    """What the second pass does differently from what was asked (for the job's warnings)."""
    from webui.prompt.dit_encode import prompt_notes

    notes = []
    sampler, schedule = request.hr_sampler_name, request.hr_scheduler
    if sampler and sampler not in FLOW_SAMPLERS and sampler != request.sampler:
        notes.append(f"hires sampler {sampler!r} is sampled with the flow-matching Euler sampler on this model")
    if schedule and schedule not in FLOW_SCHEDULE_NAMES and schedule != request.schedule:
        notes.append(f"hires schedule type {schedule!r} is not used on this model: the second pass uses its own "
                     "flow-matching shift schedule ('Simple')")
    if request.hr_prompt or request.hr_negative_prompt:
        notes += [f"hires prompt: {note}" for note in prompt_notes(
            model.arch, request.hr_prompt or request.prompt, request.hr_negative_prompt or request.negative_prompt,
            steps_of(request), pipeline=base_pipeline_class(model))]
    return tuple(dict.fromkeys(notes))


def _upscaled_input(model: Any, request: GenerationRequest, latents: torch.Tensor, img_pipe: Any,
                    size: tuple[int, int], tools: HiresTools | None, control: Any) -> Any:
    """The second pass's ``image``: upscaled latents (B, C, H/8, W/8) or upscaled PIL images."""
    arch, first_pipe = Arch(model.arch), task_pipeline(model, "txt2img")
    vae_z = vae_latents(first_pipe, arch, latents, request.width, request.height)
    if request.hr_upscaler in LATENT_MODES:
        upscaled = upscale_latents(vae_z, size, request.hr_upscaler)
        if latents_as_image(img_pipe, upscaled.shape[1]):
            return upscaled.to(device=img_pipe.transformer.device, dtype=img_pipe.transformer.dtype)
        return decode_images(first_pipe, arch, upscaled, *size)  # Chroma: the pipeline encodes them again
    return _upscale_images(decode_images(first_pipe, arch, vae_z, request.width, request.height), size, request,
                           tools, control)


def run_dit_hires(*, model: Any, request: GenerationRequest, latents: torch.Tensor, seeds: list[int], control: Any,
                  started: float, tools: HiresTools | None = None, samplers: Any = None,
                  control_cond: Any = None) -> tuple[torch.Tensor | None, bool]:
    """Second pass for one batch -> ((B, C, H, W) latents, interrupted); (None, False) when skipped.
    ``samplers`` and ``control_cond`` are accepted for the runner's call and unused (flow Euler only; DiT
    models refuse ControlNet)."""
    arch = Arch(model.arch)
    size = second_pass_size(request)
    hr_steps = steps_of(request)
    run_steps = flow_steps_run(hr_steps, request.denoising_strength)  # >= 1: requests refuse strength 0
    control.update(text=f"hires fix: upscaling to {size[0]}x{size[1]} ({request.hr_upscaler})")
    img_pipe = task_pipeline(model, "img2img")
    image = _upscaled_input(model, request, latents, img_pipe, size, tools, control)
    if control.interrupted:
        return None, True
    img_pipe.scheduler = flow_scheduler(model.components.scheduler_config)
    embeds = model.encoder.encode_schedule(request.hr_prompt or request.prompt,
                                           request.hr_negative_prompt or request.negative_prompt, hr_steps,
                                           request.clip_skip)[0][1]
    batch, per_prompt = len(seeds), len(seeds)
    if arch in REPEAT_CONDITIONING and batch > 1:  # these pipelines do not repeat embeddings passed in
        embeds, per_prompt = repeat_batch(embeds, batch), 1
    skipped: list[int] = []
    on_step = second_pass_callback(request, control, started, run_steps, skipped)

    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = img_pipe(
        **embeds, **guidance_kwargs(img_pipe, guidance_mode(model), request.cfg_scale), image=image,
        width=size[0], height=size[1], strength=request.denoising_strength, num_inference_steps=hr_steps,
        num_images_per_prompt=per_prompt, generator=generators, output_type="latent",
        callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
    ).images
    if control.interrupted:
        return None, True
    if skipped:
        return None, False
    return vae_latents(img_pipe, arch, out, *size), False
