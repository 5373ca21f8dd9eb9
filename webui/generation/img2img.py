"""img2img / inpaint / instruction-edit jobs as a ``SamplingPlan`` for the shared runner (A1111 semantics).

* img2img: the init image is fitted to width x height (``resize_mode``), encoded, noised to
  ``denoising_strength`` and sampled (diffusers img2img pipeline: steps x strength steps run).
* inpaint on a normal (4-channel) checkpoint: A1111's masked img2img.  The start latents are the init
  image's latents with the masked content option applied (original / fill / latent noise / latent
  nothing); after every step the unmasked area is put back to the original latents noised to the current
  level, so only the masked area is generated.  Afterwards the original pixels are laid over the unmasked
  area (the blurred mask feathers the edge), so unmasked pixels are bit-identical to the input.
* inpaint on a 9-channel inpaint checkpoint: diffusers' inpaint pipeline (the model sees mask + masked
  image); latent noise / latent nothing set its start latents.
* "Only masked": the masked region (+ padding, grown to the output aspect ratio) is cut out, generated at
  width x height and pasted back into the full-size original.
* soft inpainting (``request.soft_inpainting``, both checkpoint kinds, whole picture or only masked): the
  unrounded latent mask weights a per-step blend with the noised start latents, and the final overlay
  uses a weight from how much each region changed (``webui.generation.soft_inpaint``).
* instruction-edit (instruct-pix2pix, 8-channel UNet): the edit pipeline with ``image_cfg_scale``.
Worker thread only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from webui.generation import masks, soft_inpaint
from webui.generation.image_prep import normalize_image, resize_image
from webui.generation.pipeline_tasks import task_for, task_pipeline
from webui.generation.runner import SamplingPlan
from webui.image_requests import (FILL_FILL, FILL_LATENT_NOISE, FILL_LATENT_NOTHING, MASKED_CONTENT_NAMES,
                                  Img2ImgRequest)
from webui.types import RequestError, Variant

ControlFor = Callable[[Any], Any]  # (init image as the model sees it) -> ControlConditioning | None


@dataclass(frozen=True)
class PreparedImages:
    """Init images and mask as the model sees them, plus what is needed to put results back."""

    inputs: list[Any]  # RGB, width x height (masked content "fill" applied)
    originals: list[Any]  # RGB, width x height, before fill: the overlay under unmasked pixels
    mask: Any = None  # L, width x height, blurred (None: plain img2img)
    full_size: list[Any] | None = None  # "Only masked": the untouched full-size inputs to paste into
    full_mask: Any = None
    box: tuple[int, int, int, int] | None = None


def prepare_images(request: Img2ImgRequest) -> PreparedImages:
    """Pure image work: normalise, fit, mask, crop (no model involved)."""
    size = (request.width, request.height)
    names = request.names
    sources = [normalize_image(img, label=names[i] if i < len(names) else f"input image {i + 1}")
               for i, img in enumerate(request.init_images)]
    if request.mask is None:
        fitted = [resize_image(img, *size, request.resize_mode) for img in sources]
        return PreparedImages(inputs=fitted, originals=fitted)
    if request.inpaint_full_res:
        full = sources[0]
        full_mask = masks.prepare_mask(request.mask, full.size, invert=request.inpainting_mask_invert,
                                       blur=request.mask_blur)
        box = masks.crop_region(full_mask, request.inpaint_full_res_padding)
        box = masks.expand_to_aspect(box, size[0], size[1], full.width, full.height)
        crops = [masks.crop_for_generation(img if img.size == full.size else img.resize(full.size), box, *size)
                 for img in sources]
        mask = masks.crop_for_generation(full_mask, box, *size)
        inputs = [masks.fill_masked(c, mask) for c in crops] if request.inpainting_fill == FILL_FILL else crops
        return PreparedImages(inputs=inputs, originals=crops, mask=mask, full_size=sources, full_mask=full_mask,
                              box=box)
    fitted = [resize_image(img, *size, request.resize_mode) for img in sources]
    mask = masks.prepare_mask(request.mask, sources[0].size, invert=request.inpainting_mask_invert,
                              blur=request.mask_blur)
    mask = resize_image(mask.convert("RGB"), *size, request.resize_mode).convert("L")
    inputs = [masks.fill_masked(f, mask) for f in fitted] if request.inpainting_fill == FILL_FILL else fitted
    return PreparedImages(inputs=inputs, originals=fitted, mask=mask)


def encode_images(pipe: Any, images: list[Any]) -> torch.Tensor:
    """VAE latents (distribution mean, scaled like the pipelines do) of PIL images."""
    vae = pipe.vae
    pixels = pipe.image_processor.preprocess(images)
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    dtype = torch.float32 if upcast else vae.dtype
    with torch.no_grad():
        module = vae.to(dtype) if upcast else vae
        latents = module.encode(pixels.to(device=vae.device, dtype=dtype)).latent_dist.mean
        if upcast:
            vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(pipe.unet.dtype)


def _cycle(items: list[Any], start: int, count: int) -> list[Any]:
    return [items[(start + i) % len(items)] for i in range(count)]


def steps_to_run(request: Img2ImgRequest) -> int:
    run = min(int(request.steps * request.denoising_strength), request.steps)
    if run < 1:
        raise RequestError(f"denoising strength {request.denoising_strength} x {request.steps} steps leaves no step "
                           "to run; raise the denoising strength (or the steps)")
    return run


def infotext_fields(request: Img2ImgRequest, task: str) -> dict[str, Any]:
    """A1111's img2img/inpaint infotext fields."""
    fields: dict[str, Any] = {}
    if task == "edit":
        fields["Image CFG scale"] = request.image_cfg_scale
    else:
        fields["Denoising strength"] = request.denoising_strength
    if request.resize_mode:
        fields["Resize mode"] = request.resize_mode
    if request.mask is not None:
        fields["Mask blur"] = request.mask_blur
        fields["Masked content"] = MASKED_CONTENT_NAMES[request.inpainting_fill]
        if request.inpainting_mask_invert:
            fields["Mask mode"] = "Inpaint not masked"
        if request.inpaint_full_res:
            fields["Inpaint area"] = "Only masked"
            fields["Masked area padding"] = request.inpaint_full_res_padding
    return fields


def build_plan(model: Any, request: Img2ImgRequest, control_for: ControlFor | None = None) -> SamplingPlan:
    prepared = prepare_images(request)
    variant = model.components.variant
    task = task_for(variant, has_image=True, has_mask=prepared.mask is not None)
    masked_4ch = task == "inpaint" and variant is not Variant.INPAINT
    pipe_task = "img2img" if masked_4ch else task
    control_cond = control_for(prepared.inputs[0]) if control_for is not None else None
    pipe = task_pipeline(model, pipe_task, controlnet=getattr(control_cond, "controlnet", None))
    call: dict[str, Any] = {"width": request.width, "height": request.height} if pipe_task == "inpaint" else {}
    if control_cond is not None:
        call["control_image"] = control_cond.images
        call.update(control_cond.kwargs)
    if "XL" in type(pipe).__name__:
        call.update(original_size=(request.height, request.width), target_size=(request.height, request.width))
    batch = request.batch_size
    steps_run = request.steps if task == "edit" else steps_to_run(request)
    state: dict[str, Any] = {}
    soft = request.soft_inpainting if task == "inpaint" else None  # A1111: soft inpainting keeps the mask unrounded
    latent_mask = (masks.latent_mask(prepared.mask, (request.width // 8, request.height // 8),
                                     round_values=soft is None) if prepared.mask is not None else None)

    def batch_kwargs(batch_index: int, seeds: list[int], noise: torch.Tensor) -> dict[str, Any]:
        start = batch_index * batch
        inputs = _cycle(prepared.inputs, start, batch)
        if task == "edit":
            return {"image": inputs, "image_guidance_scale": request.image_cfg_scale}
        kwargs: dict[str, Any] = {"strength": request.denoising_strength}
        if masked_4ch:
            originals = encode_images(pipe, _cycle(prepared.originals, start, batch))
            mask = latent_mask.to(device=originals.device, dtype=originals.dtype)
            begin = _start_latents(encode_images(pipe, inputs), noise, mask, request.inpainting_fill)
            state.update(originals=begin if soft is not None else originals, mask=mask, noise=noise)
            kwargs["image"] = begin
            return kwargs
        kwargs["image"] = inputs
        if task == "inpaint" and soft is not None:  # 9-channel: the soft blend needs the start latents too
            encoded = encode_images(pipe, inputs)
            mask = latent_mask.to(device=encoded.device, dtype=encoded.dtype)
            state.update(originals=_start_latents(encoded, noise, mask, request.inpainting_fill), mask=mask,
                         noise=noise)
        if task == "inpaint":
            kwargs["mask_image"] = [prepared.mask] * batch
            if request.inpainting_fill in (FILL_LATENT_NOISE, FILL_LATENT_NOTHING):
                kwargs["latents"] = _noised_start(pipe, request, encode_images(pipe, inputs), noise, latent_mask)
        return kwargs

    def blend_unmasked(p: Any, step: int, tensors: dict[str, Any]) -> dict[str, Any]:
        """A1111's masked img2img: outside the mask, the original latents at the current noise level."""
        scheduler, latents = p.scheduler, tensors["latents"]
        originals, mask, noise = state["originals"], state["mask"], state["noise"]
        index = getattr(scheduler, "step_index", None)
        if index is None:  # DDIM / PLMS keep no step index: count from the step
            index = soft_inpaint.scheduler_position(scheduler, step, steps_run) + 1
        timesteps = scheduler.timesteps
        if index is None or index >= len(timesteps):
            background = originals
        else:
            background = scheduler.add_noise(originals, noise, timesteps[index:index + 1])
        if soft is not None:  # A1111 soft inpainting: the mask as continuous, noise-level dependent weights
            sigma = soft_inpaint.step_sigma(scheduler, soft_inpaint.scheduler_position(scheduler, step, steps_run))
            state["latents"] = soft_inpaint.blend_step(background, latents, mask, sigma, soft)
            return {"latents": state["latents"]}
        return {"latents": latents * mask + background.to(latents.dtype) * (1 - mask)}

    def finish(image: Any, index: int) -> Any:
        if prepared.mask is None:
            return image
        if soft is not None and "latents" in state:
            return _soft_composite(prepared, state, soft, image, index, batch)
        if prepared.box is not None:
            full = prepared.full_size[index % len(prepared.full_size)]
            return masks.paste_back(full, image, prepared.box, prepared.full_mask)
        return masks.composite_masked(prepared.originals[index % len(prepared.originals)], image, prepared.mask)

    infotext = {**infotext_fields(request, task), **(getattr(control_cond, "infotext", {}) or {})}
    if soft is not None:
        infotext.update(soft_inpaint.infotext_fields(soft))
    return SamplingPlan(pipe=pipe, mode="img2img", steps_run=steps_run, call_kwargs=call, batch_kwargs=batch_kwargs,
                        on_step=blend_unmasked if masked_4ch or soft is not None else None, finish=finish,
                        infotext=infotext,
                        prompt_schedule=task != "edit",
                        extra_images=tuple(getattr(control_cond, "maps", ()) or ()),
                        info={"task": task, "denoising_strength": request.denoising_strength})


def _soft_composite(prepared: PreparedImages, state: dict[str, Any], soft: Any, image: Any, index: int,
                    batch: int) -> Any:
    """Soft inpainting's final overlay: original pixels wherever the latents did not change much."""
    offset = index % batch
    weight = soft_inpaint.difference_mask(state["mask"], state["originals"][offset], state["latents"][offset], soft,
                                          (image.width, image.height))
    if prepared.box is not None:
        full = prepared.full_size[index % len(prepared.full_size)]
        return masks.paste_back(full, image, prepared.box, soft_inpaint.uncrop_mask(weight, full.size, prepared.box))
    return masks.composite_masked(prepared.originals[index % len(prepared.originals)], image, weight)


def _start_latents(latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, fill: int) -> torch.Tensor:
    """A1111 masked content for the start latents: latent noise / latent nothing inside the mask."""
    if fill == FILL_LATENT_NOISE:
        return latents * (1 - mask) + noise.to(latents.dtype) * mask
    if fill == FILL_LATENT_NOTHING:
        return latents * (1 - mask)
    return latents


def _noised_start(pipe: Any, request: Img2ImgRequest, latents: torch.Tensor, noise: torch.Tensor,
                  latent_mask: torch.Tensor) -> torch.Tensor:
    """9-channel inpaint models: start latents (masked content applied, noised to the strength), scaled so
    that the pipeline's ``latents * init_noise_sigma`` gives them back."""
    scheduler = pipe.scheduler
    mask = latent_mask.to(device=latents.device, dtype=latents.dtype)
    start = _start_latents(latents, noise, mask, request.inpainting_fill)
    scheduler.set_timesteps(request.steps, device=latents.device)
    timesteps, _ = pipe.get_timesteps(request.steps, request.denoising_strength, latents.device)
    noised = scheduler.add_noise(start, noise.to(start.dtype), timesteps[:1])
    sigma = scheduler.init_noise_sigma
    scheduler.set_timesteps(request.steps, device=latents.device)  # the pipeline sets it up again from scratch
    return noised / sigma
