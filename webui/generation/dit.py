"""DiT families (SD3/3.5, Flux.1 dev/schnell, Flux Kontext, Qwen-Image, Qwen-Image-Edit) as ``SamplingPlan``s.

Same runner, seeds, previews, Interrupt/Skip, saving and infotext as the UNet models; what differs is here:

* latents: Flux and Qwen-Image pipelines work on *packed* latents (2x2 latent patches -> one token of 4C
  values).  The runner still makes one CPU noise tensor per seed in the VAE layout ``(C, H/8, W/8)`` (what
  diffusers draws with the same generator), and the plan packs it with the pipeline's own ``_pack_latents``;
  previews and decoding unpack with ``_unpack_latents``.  SD3 latents are not packed.
* guidance (``GUIDANCE``): Flux dev's CFG value is the distilled ``guidance_scale`` fed to the model (schnell
  ignores it; no negative prompt); SD3 runs real CFG with the negative prompt; Qwen-Image runs "true CFG"
  (``true_cfg_scale``) with the negative prompt (and a ``guidance_scale`` only on guidance-distilled weights).
* sampler: the model's own flow-matching Euler scheduler, built fresh per job from
  ``components.scheduler_config`` (its shift settings kept); infotext says ``Sampler: Euler, Schedule type:
  Simple`` like Forge.  Other samplers are refused (no DDPM-style scheduler fits a flow model).
* edit (``Variant.EDIT``): Flux Kontext and Qwen-Image-Edit take the img2img tab's image(s) as references;
  the output size is the request's.  Several references: Qwen-Image-Edit uses the multi-image (Plus)
  pipeline; Kontext gets them stitched side by side (ComfyUI's approach).
* img2img on non-edit DiT models: the family's img2img pipeline (strength = denoising strength).
* Chroma (``Arch.FLUX``, its own pipeline: ``pipeline_tasks.FAMILY_TASKS``): real CFG with the negative prompt
  and T5 attention masks (``GUIDANCE_BY_PIPELINE``); txt2img and img2img.
* inpainting: Flux.1 Fill models (``webui.generation.dit_fill``); other DiT models refuse a mask.
* hires fix (txt2img): ``webui.generation.dit_hires`` (the plan's ``hires`` hook): upscale, then the family's
  img2img pipeline at the larger size; refused on Flux.1 Fill and edit models (Kontext, Qwen-Image-Edit).
* not yet: ControlNet and IP-Adapter on DiT models (clear ``RequestError``).
Worker thread only.
"""
from __future__ import annotations

from functools import partial
from types import MappingProxyType
from typing import Any, Mapping

import torch

from webui.generation.pipeline_tasks import base_pipeline_class, task_pipeline
from webui.generation.runner import SamplingPlan, decode as vae_decode
from webui.image_requests import Img2ImgRequest
from webui.prompt.dit_encode import DIT_ARCHES
from webui.types import Arch, GenerationRequest, RequestError, Variant

__all__ = ["DIT_ARCHES", "FLOW_SAMPLERS", "build_dit_plan", "check_request", "decode_images", "fit_area",
           "flow_scheduler", "flow_steps_run", "repeat_batch", "stitch_references", "vae_latents"]

PACKED = frozenset({Arch.FLUX, Arch.QWEN_IMAGE})  # 2x2 latent patches packed into tokens
LABELS: Mapping[Arch, str] = MappingProxyType({Arch.SD3: "SD3", Arch.FLUX: "Flux", Arch.QWEN_IMAGE: "Qwen-Image"})
REPEAT_CONDITIONING = frozenset({Arch.FLUX, Arch.SD3})  # encode_prompt ignores num_images_per_prompt for embeds
FLOW_SAMPLERS = ("Euler",)
FLOW_SCHEDULES = ("Automatic", "Simple")
INFOTEXT_SAMPLER = ("Euler", "Simple")
GUIDANCE: Mapping[Arch, str] = MappingProxyType({
    Arch.FLUX: "distilled",  # guidance_scale embedded in the model (dev); schnell: none
    Arch.SD3: "cfg",  # guidance_scale = classifier-free guidance with the negative prompt
    Arch.QWEN_IMAGE: "true_cfg",  # true_cfg_scale with the negative prompt
})
# families sharing an Arch but guided differently, by pipeline class
GUIDANCE_BY_PIPELINE: Mapping[str, str] = MappingProxyType({"ChromaPipeline": "cfg"})


def guidance_mode(model: Any) -> str:
    return GUIDANCE_BY_PIPELINE.get(base_pipeline_class(model), GUIDANCE[Arch(model.arch)])


def _label(model: Any) -> str:
    return LABELS.get(model.arch, str(getattr(model.arch, "value", model.arch)))


# variants without a hires second pass (their img2img would drop the mask / the reference images)
HIRES_REFUSED: Mapping[Variant, str] = MappingProxyType({Variant.INPAINT: "Flux.1 Fill (inpainting)",
                                                         Variant.EDIT: "edit (Flux.1 Kontext, Qwen-Image-Edit)"})
DEFAULT_SAMPLER = "Euler a"  # A1111's default: what most API clients send; sampled as flow Euler with a note


def check_request(model: Any, request: GenerationRequest) -> None:
    """Refuse what DiT models do not do yet, with what to do instead."""
    label = _label(model)
    if request.sampler not in FLOW_SAMPLERS and request.sampler != DEFAULT_SAMPLER:
        raise RequestError(f"sampler {request.sampler!r} is not available for {label} models: they sample with the "
                           f"flow-matching Euler sampler. Choose sampler 'Euler' (schedule 'Simple').")
    if request.schedule not in FLOW_SCHEDULES:
        raise RequestError(f"schedule type {request.schedule!r} is not available for {label} models: use 'Simple' "
                           "(the model's own flow-matching shift schedule) or 'Automatic'.")
    if request.enable_hr and model.components.variant in HIRES_REFUSED:
        raise RequestError(f"hires fix is not available for {HIRES_REFUSED[model.components.variant]} models: turn "
                           "hires fix off and upscale the result in img2img (with a Flux.1 dev / schnell, Chroma, "
                           "SD3 or Qwen-Image checkpoint) or in Extras")
    if request.controlnet and any(getattr(u, "enabled", True) for u in request.controlnet):
        raise RequestError(f"ControlNet is not supported for {label} models yet: disable the ControlNet units")
    if request.ip_adapters:
        raise RequestError(f"IP-Adapter reference images are not supported for {label} models yet: remove them"
                           + (" (Kontext / Qwen-Image-Edit take reference images in the img2img tab)"
                              if model.components.variant is Variant.EDIT else ""))
    if isinstance(request, Img2ImgRequest) and request.mask is not None \
            and model.components.variant is not Variant.INPAINT:
        raise RequestError(f"inpainting is not supported for {label} models (except Flux.1 Fill) yet: use img2img "
                           "without a mask, or a Flux.1 Fill model")
    if isinstance(request, Img2ImgRequest) and request.mask is not None and request.soft_inpainting is not None:
        raise RequestError(f"soft inpainting is not supported for {label} models yet: turn Soft inpainting off "
                           "(a larger Mask blur still softens the edge), or use an SD1.x / SD2 / SDXL checkpoint")
    multiple = 16
    for side in ("width", "height"):
        value = getattr(request, side)
        if model.arch in PACKED and value % multiple:
            raise RequestError(f"{side} {value} is not a multiple of {multiple}, which {label} models need; use "
                               f"{value - value % multiple} or {value - value % multiple + multiple}")


def flow_scheduler(scheduler_config: Any) -> Any:
    """A fresh FlowMatchEulerDiscreteScheduler with the model's own settings (shift, dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = dict(scheduler_config or {})
    config.pop("_class_name", None)
    config.pop("_diffusers_version", None)
    return FlowMatchEulerDiscreteScheduler.from_config(config)


# ----------------------------------------------------------------------------- latent layout
def _vae_scale(pipe: Any) -> int:
    return int(getattr(pipe, "vae_scale_factor", 8) or 8)


def _latent_channels(pipe: Any, arch: Arch) -> int:
    in_channels = int(pipe.transformer.config.in_channels)
    return in_channels // 4 if arch in PACKED else in_channels


def latent_shape(pipe: Any, arch: Arch, width: int, height: int) -> tuple[int, int, int]:
    """Per-image noise shape in the VAE latent layout (what diffusers draws before packing)."""
    scale = _vae_scale(pipe)
    if arch in PACKED:
        return _latent_channels(pipe, arch), 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    return _latent_channels(pipe, arch), height // scale, width // scale


def pack(pipe: Any, noise: torch.Tensor) -> torch.Tensor:
    batch, channels, h, w = noise.shape
    return pipe._pack_latents(noise, batch, channels, h, w)


def unpack(pipe: Any, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed tokens -> (B, C, h, w) latents (Qwen's frame axis dropped)."""
    out = pipe._unpack_latents(latents, height, width, _vae_scale(pipe))
    return out[:, :, 0] if out.ndim == 5 else out


def qwen_decode(pipe: Any, latents: torch.Tensor) -> list[Any]:
    """Qwen-Image VAE: per-channel mean/std normalised latents with a frame axis."""
    vae = pipe.vae
    z = latents.unsqueeze(2) if latents.ndim == 4 else latents
    z = z.to(device=vae.device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        image = vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


# ----------------------------------------------------------------------------- reference images
def fit_area(size: tuple[int, int], area: int, multiple: int = 16) -> tuple[int, int]:
    """(w, h) with ``size``'s aspect ratio and about ``area`` pixels, both multiples of ``multiple``."""
    w, h = size
    ratio = w / h
    width = max(multiple, round((area * ratio) ** 0.5 / multiple) * multiple)
    height = max(multiple, round((area / ratio) ** 0.5 / multiple) * multiple)
    return int(width), int(height)


def stitch_references(images: list[Any]) -> Any:
    """Several references side by side on one canvas (height of the tallest, centred)."""
    from PIL import Image

    if len(images) == 1:
        return images[0]
    height = max(img.height for img in images)
    canvas = Image.new("RGB", (sum(img.width for img in images), height), (0, 0, 0))
    x = 0
    for img in images:
        canvas.paste(img, (x, (height - img.height) // 2))
        x += img.width
    return canvas


def _references(request: Img2ImgRequest) -> list[Any]:
    from webui.generation.image_prep import normalize_image

    names = request.names
    return [normalize_image(img, label=names[i] if i < len(names) else f"reference image {i + 1}")
            for i, img in enumerate(request.init_images)]


# ----------------------------------------------------------------------------- plans
def guidance_kwargs(pipe: Any, mode: str, cfg: float) -> dict[str, Any]:
    if mode == "true_cfg":
        distilled = bool(getattr(pipe.transformer.config, "guidance_embeds", False))
        return {"true_cfg_scale": cfg, "guidance_scale": cfg if distilled else None}
    return {"guidance_scale": cfg}


def _edit_task(model: Any, count: int) -> str:
    if model.arch is Arch.QWEN_IMAGE and (count > 1 or type(model.pipe).__name__ == "QwenImageEditPlusPipeline"):
        return "edit_multi"
    return "edit"


def build_dit_plan(model: Any, request: GenerationRequest) -> SamplingPlan:
    """txt2img / img2img / edit plan for a DiT model (see the module docstring)."""
    if model.components.variant is Variant.INPAINT:  # Flux.1 Fill: its own plan (masks, start latents, overlay)
        from webui.generation.dit_fill import build_fill_plan

        return build_fill_plan(model, request)
    check_request(model, request)
    arch, variant = Arch(model.arch), model.components.variant
    images = _references(request) if isinstance(request, Img2ImgRequest) and request.init_images else []
    if images and variant is Variant.EDIT:
        task = _edit_task(model, len(images))
    elif images:
        task = "img2img"
    else:
        task = "txt2img"
    pipe = task_pipeline(model, task)
    width, height, batch = request.width, request.height, request.batch_size
    guidance = guidance_mode(model)
    call: dict[str, Any] = {"width": width, "height": height, **guidance_kwargs(pipe, guidance, request.cfg_scale)}
    infotext: dict[str, Any] = {}
    info: dict[str, Any] = {"task": task, "sampler_name": INFOTEXT_SAMPLER[0], "scheduler": INFOTEXT_SAMPLER[1],
                            "guidance": guidance}
    steps_run = 0
    if task == "img2img":
        from webui.generation.image_prep import resize_image
        from webui.generation.img2img import steps_to_run

        fitted = [resize_image(img, width, height, request.resize_mode) for img in images]
        steps_to_run(request)  # refuses a strength that leaves no step (A1111's rule, as for SD)
        steps_run = flow_steps_run(request.steps, request.denoising_strength)  # what the pipeline runs
        infotext["Denoising strength"] = request.denoising_strength
        info["denoising_strength"] = request.denoising_strength

        def batch_kwargs(batch_index: int, _seeds: list[int], _noise: torch.Tensor) -> dict[str, Any]:
            # the pipeline noises the image itself with the per-image CPU generators (same seed, same image)
            start = batch_index * batch
            return {"image": [fitted[(start + i) % len(fitted)] for i in range(batch)],
                    "strength": request.denoising_strength}
    else:
        if task.startswith("edit"):
            call.update(_edit_inputs(arch, task, images, width, height))
            infotext["Reference images"] = len(images)
            info["reference_images"] = len(images)

        def batch_kwargs(_batch_index: int, _seeds: list[int], noise: torch.Tensor) -> dict[str, Any]:
            return {"latents": pack(pipe, noise) if arch in PACKED else noise}

    conditioning = None
    if arch in REPEAT_CONDITIONING and batch > 1:  # these pipelines do not repeat embeddings passed in
        call["num_images_per_prompt"] = 1
        conditioning = partial(repeat_batch, batch=batch)

    hires, notes = None, ()
    if request.enable_hr and task == "txt2img":  # second pass: webui.generation.dit_hires
        from webui.generation.dit_hires import hires_notes, run_dit_hires

        hires, notes = run_dit_hires, hires_notes(model, request)
        infotext.update({"Hires sampler": None, "Hires schedule type": None})  # sampled with flow Euler
    to_vae = (lambda latents: vae_latents(pipe, arch, latents, width, height)) if arch in PACKED else None
    return SamplingPlan(
        pipe=pipe, mode="img2img" if images else "txt2img", steps_run=steps_run, call_kwargs=call,
        batch_kwargs=batch_kwargs, infotext=infotext, prompt_schedule=False, info=info,
        latent_shape=latent_shape(pipe, arch, width, height), to_vae_latents=to_vae,
        decode=lambda p, latents: decode_images(p, arch, latents, width, height),
        make_scheduler=lambda _seed: flow_scheduler(model.components.scheduler_config),
        sampler_label=INFOTEXT_SAMPLER, conditioning=conditioning, hires=hires, notes=notes,
    )


def flow_steps_run(steps: int, strength: float) -> int:
    """Steps the flow-matching img2img / inpaint pipelines run for ``steps`` x ``strength`` (their
    ``get_timesteps`` skips the first ``int(steps - steps * strength)``); at least 1 for any strength > 0."""
    return steps - int(max(steps - min(steps * strength, steps), 0))


def repeat_batch(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """Conditioning tensors of batch 1 repeated to ``batch`` (for ``REPEAT_CONDITIONING`` pipelines)."""
    return {k: v.repeat(batch, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.shape[0] == 1
            else v for k, v in kwargs.items()}


def vae_latents(pipe: Any, arch: Arch, latents: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pipeline latents -> (B, C, h, w): packed tokens (Flux, Qwen-Image: 3-D) are unpacked for ``width`` x
    ``height``; (B, C, h, w) latents (SD3, and what the hires pass returns) are returned as they are."""
    return unpack(pipe, latents, width, height) if arch in PACKED and latents.ndim == 3 else latents


def decode_images(pipe: Any, arch: Arch, latents: torch.Tensor, width: int, height: int) -> list[Any]:
    """Pipeline latents (packed or not, see ``vae_latents``) -> PIL images through the family's VAE."""
    z = vae_latents(pipe, arch, latents, width, height)
    return qwen_decode(pipe, z) if arch is Arch.QWEN_IMAGE else vae_decode(pipe, z)


def _edit_inputs(arch: Arch, task: str, images: list[Any], width: int, height: int) -> dict[str, Any]:
    """Reference-image kwargs of the edit pipelines."""
    if arch is Arch.FLUX:  # Kontext: one reference (several stitched), sized to the output's area
        reference = stitch_references(images)
        reference = reference.resize(fit_area(reference.size, width * height), resample=3)
        return {"image": reference, "max_area": width * height, "_auto_resize": False}
    if task == "edit_multi":
        return {"image": images}
    return {"image": images[0]}
