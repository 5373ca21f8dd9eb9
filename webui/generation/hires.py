"""Hires fix (A1111 semantics) as a second pass after txt2img's first pass.

``run_txt2img`` samples at the base size and hands the first-pass latents here.  We upscale them --
in latent space for the ``Latent*`` modes (``torch.nn.functional.interpolate``), or decode -> image
upscaler (Lanczos/Nearest/ESRGAN...) -> let the img2img pipeline encode -- and run the img2img pipeline
built with ``from_pipe`` (shares every component: no extra memory) with ``strength = denoising_strength``,
the hires sampler/prompt when given, and generators seeded with the same per-image seeds.
Worker thread only.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from webui.types import GenerationRequest, RequestError

# A1111 latent upscale modes -> (interpolate mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
_IMG2IMG = {"StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
            "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline"}


@dataclass(frozen=True)
class HiresTools:
    """What the hires pass needs from the app for image upscalers (given by the job handler)."""

    entries: list
    cache: Any
    settings: Any


def target_size(request: GenerationRequest) -> tuple[int, int]:
    """Second-pass (width, height), multiples of 8, A1111 rules for hr_scale / hr_resize_x / hr_resize_y."""
    w, h = request.width, request.height
    rx, ry = request.hr_resize_x, request.hr_resize_y
    if rx == 0 and ry == 0:
        tw, th = w * request.hr_scale, h * request.hr_scale
    elif ry == 0:
        tw, th = rx, rx * h / w
    elif rx == 0:
        tw, th = ry * w / h, ry
    else:
        tw, th = rx, ry
    tw, th = int(tw) // 8 * 8, int(th) // 8 * 8
    if max(tw, th) > 4096 or min(tw, th) < 64:
        raise RequestError(f"hires fix target {tw}x{th} is outside 64..4096; lower hr_scale or hr_resize_x/y")
    return tw, th


def steps_of(request: GenerationRequest) -> int:
    return request.hr_second_pass_steps or request.steps


def infotext_extra(request: GenerationRequest) -> dict[str, Any]:
    """A1111's hires infotext fields (Size stays the first-pass size)."""
    if not request.enable_hr:
        return {}
    extra: dict[str, Any] = {"Denoising strength": request.denoising_strength}
    if request.hr_resize_x or request.hr_resize_y:
        tw, th = target_size(request)
        extra["Hires resize"] = f"{tw}x{th}"
    else:
        extra["Hires upscale"] = request.hr_scale
    extra["Hires steps"] = request.hr_second_pass_steps or None
    extra["Hires upscaler"] = request.hr_upscaler
    if request.hr_sampler_name and request.hr_sampler_name != request.sampler:
        extra["Hires sampler"] = request.hr_sampler_name
    if request.hr_scheduler and request.hr_scheduler != request.schedule:
        extra["Hires schedule type"] = request.hr_scheduler
    if request.hr_prompt and request.hr_prompt != request.prompt:
        extra["Hires prompt"] = request.hr_prompt
    if request.hr_negative_prompt and request.hr_negative_prompt != request.negative_prompt:
        extra["Hires negative prompt"] = request.hr_negative_prompt
    return extra


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    interp, antialias = LATENT_MODES[mode]
    shape = (size[1] // 8, size[0] // 8)
    return torch.nn.functional.interpolate(latents.float(), size=shape, mode=interp,
                                           antialias=antialias).to(latents.dtype)


def img2img_pipe(model: Any, controlnet: Any = None) -> Any:
    """The img2img pipeline (with ``controlnet``: the ControlNet img2img one) over the model's components:
    a ``from_pipe`` view (no copies), kept with the model's other task views."""
    from webui.generation.pipeline_tasks import task_pipeline

    if type(model.pipe).__name__ not in _IMG2IMG:
        raise RequestError(f"hires fix is not available for {type(model.pipe).__name__} models")
    return task_pipeline(model, "img2img", controlnet=controlnet)


def hires_control(control_cond: Any, size: tuple[int, int]) -> dict[str, Any]:
    """The txt2img ControlNet units again in the second pass (sd-webui-controlnet does the same): each map
    scaled to cover the hires size and centre-cropped, as the upscaled image is; same weights and ranges."""
    from PIL import Image, ImageOps

    if getattr(control_cond, "controlnet", None) is None:
        return {}
    images = [m if m.size == size else ImageOps.fit(m, size, Image.Resampling.LANCZOS) for m in control_cond.images]
    return {"control_image": images, **control_cond.kwargs}


def _upscale_images(images: list[Image.Image], size: tuple[int, int], request: GenerationRequest,
                    tools: HiresTools | None, control: Any) -> list[Image.Image]:
    from webui.generation.upscale import UpscaleSettings, apply_upscaler, _center_crop
    from webui.generation.upscalers import BUILTIN, UpscalerEntry, find_upscaler

    if tools is None:
        if request.hr_upscaler not in BUILTIN:
            raise RequestError(f"hires upscaler {request.hr_upscaler!r} is not available here")
        entry, cache, settings = UpscalerEntry(request.hr_upscaler, "resample"), None, UpscaleSettings()
        if request.hr_upscaler == "None":
            entry = UpscalerEntry("None", "none")
    else:
        entry, cache, settings = find_upscaler(tools.entries, request.hr_upscaler), tools.cache, tools.settings
    out = []
    for image in images:
        scale = max(size[0] / image.width, size[1] / image.height)
        cover = (max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale)))
        up = apply_upscaler(entry, image, cover, cache=cache, settings=settings,
                            on_tile=lambda i, n: control.update(text=f"hires upscale: {entry.name} tile {i}/{n}"),
                            should_stop=lambda: control.interrupted)
        out.append(up if up.size == size else _center_crop(up, size))
    return out


def run_hires(*, model: Any, request: GenerationRequest, latents: torch.Tensor, seeds: list[int], control: Any,
              started: float, tools: HiresTools | None = None, samplers: Any = None,
              control_cond: Any = None) -> tuple[torch.Tensor | None, bool]:
    """Second pass for one batch; returns (final latents, interrupted).  ``control_cond``: the first pass's
    ControlNet conditioning (``webui.generation.control.ControlConditioning``), applied again."""
    from webui.generation.runner import decode
    from webui.generation.samplers import make_scheduler

    pipe = model.pipe
    size = target_size(request)
    hr_steps = steps_of(request)
    device = pipe.unet.device
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    control.update(text=f"hires fix: upscaling to {size[0]}x{size[1]} ({request.hr_upscaler})")
    if request.hr_upscaler in LATENT_MODES:
        image_input: Any = upscale_latents(latents, size, request.hr_upscaler).to(device=device, dtype=pipe.unet.dtype)
    else:
        image_input = _upscale_images(decode(pipe, latents), size, request, tools, control)
    if control.interrupted:
        return None, True
    img_pipe = img2img_pipe(model, getattr(control_cond, "controlnet", None))
    sampler = request.hr_sampler_name or request.sampler
    schedule = request.hr_scheduler or request.schedule
    img_pipe.scheduler = make_scheduler(
        model.components.scheduler_config, sampler, schedule,
        prediction_type=model.prediction.value if model.prediction else None,
        rescale_betas_zero_snr=bool(model.components.zero_terminal_snr), seed=seeds[0] if seeds else None,
        registry=samplers)
    prompt = request.hr_prompt or request.prompt
    negative = request.hr_negative_prompt or request.negative_prompt
    embeds = model.encoder.encode_schedule(prompt, negative, hr_steps, request.clip_skip)[0][1]
    run_steps = int(hr_steps * request.denoising_strength)
    if run_steps < 1:
        raise RequestError(f"hires fix: denoising strength {request.denoising_strength} x {hr_steps} hires steps "
                           "leaves no step to run; raise the denoising strength or the hires steps")
    skipped: list[int] = []
    on_step = second_pass_callback(request, control, started, run_steps, skipped)
    kwargs: dict[str, Any] = hires_control(control_cond, size)
    if "SDXL" in type(img_pipe).__name__:
        kwargs.update(original_size=(size[1], size[0]), target_size=(size[1], size[0]))
    result = img_pipe(
        **embeds, image=image_input, strength=request.denoising_strength, num_inference_steps=hr_steps,
        guidance_scale=request.cfg_scale, num_images_per_prompt=request.batch_size, generator=generators,
        output_type="latent", callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
        **kwargs,
    ).images
    if control.interrupted:
        return None, True
    return (None, False) if skipped else (result, False)


def second_pass_callback(request: GenerationRequest, control: Any, started: float, run_steps: int,
                         skipped: list[int]) -> Callable[..., dict[str, Any]]:
    """The second pass's ``callback_on_step_end``: progress continues from the first pass's steps; Interrupt
    stops the job, Skip stops this batch (its step is appended to ``skipped``)."""
    total = request.steps + run_steps

    def on_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        done = request.steps + step + 1
        elapsed = time.perf_counter() - started
        control.update(step=done, total_steps=total, eta_seconds=elapsed / done * (total - done),
                       text=f"hires step {step + 1}/{run_steps}")
        if control.interrupted:
            pipe._interrupt = True
        elif control.consume_skip():
            skipped.append(step)
            pipe._interrupt = True
        return {}

    return on_step
