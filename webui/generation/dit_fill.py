"""Flux.1 Fill (inpaint transformer, 384 input channels) jobs as a ``SamplingPlan``.

The Fill transformer sees, per packed token, 64 latent values + 64 of the masked image's latents + 256 of the
mask (the pixel mask 8x8-unshuffled to 64 channels at latent size, then packed 2x2).  diffusers'
``FluxFillPipeline`` builds that conditioning from ``image`` + ``mask_image`` (``prepare_mask_latents``: the
mask is binarised at 0.5, the masked image is ``image * (1 - mask)``); the plan hands it the images as
A1111's inpaint prepares them (``webui.generation.img2img.prepare_images``: blur, invert, masked content,
"Only masked" crop) and owns the rest:

* start latents: the job's CPU noise, packed (denoising strength 1); below 1, the init image's latents
  (masked content "latent noise" / "latent nothing" applied under the mask) noised to the first sigma of the
  pipeline's own schedule (``first_sigma``), so the pipeline runs steps x strength steps from there;
* afterwards the original pixels are laid over the unmasked area (A1111's overlay; blurred edge), so unmasked
  pixels equal the input;
* img2img without a mask regenerates the whole image (full mask); txt2img inpaints a blank image under a full
  mask (as A1111 does with inpainting checkpoints).
Worker thread only.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from webui.generation import masks
from webui.generation.dit import (GUIDANCE, INFOTEXT_SAMPLER, check_request, flow_scheduler, flow_steps_run, pack,
                                  unpack)
from webui.generation.pipeline_tasks import task_pipeline
from webui.generation.runner import SamplingPlan, decode as vae_decode
from webui.image_requests import FILL_LATENT_NOISE, FILL_LATENT_NOTHING, Img2ImgRequest
from webui.types import GenerationRequest

BLANK = (127, 127, 127)


def first_sigma(scheduler_config: Any, steps: int, strength: float, image_seq_len: int) -> float:
    """The noise level FluxFillPipeline starts at for ``strength`` (its sigmas, shift and ``get_timesteps``)."""
    from diffusers.pipelines.flux.pipeline_flux_fill import calculate_shift

    scheduler = flow_scheduler(scheduler_config)
    config = scheduler.config
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return float(scheduler.sigmas[steps - flow_steps_run(steps, strength)])


def encode_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (distribution mean) of [-1, 1] pixels, shifted and scaled like the Flux pipelines."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def start_latents(latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, fill: int,
                  sigma: float) -> torch.Tensor:
    """Init latents with A1111's latent masked content applied, noised to ``sigma`` (flow matching)."""
    noise = noise.to(latents.dtype)
    if fill == FILL_LATENT_NOISE:
        latents = latents * (1 - mask) + noise * mask
    elif fill == FILL_LATENT_NOTHING:
        latents = latents * (1 - mask)
    return sigma * noise + (1.0 - sigma) * latents


def build_fill_plan(model: Any, request: GenerationRequest) -> SamplingPlan:
    from PIL import Image

    from webui.generation.img2img import infotext_fields, prepare_images, steps_to_run

    check_request(model, request)
    pipe = task_pipeline(model, "inpaint")
    width, height, batch = request.width, request.height, request.batch_size
    size = (width, height)
    has_image = isinstance(request, Img2ImgRequest) and bool(request.init_images)
    if has_image:
        prepared = prepare_images(request)
        inputs, mask = prepared.inputs, prepared.mask
        strength = float(request.denoising_strength)
        if strength < 1:
            steps_to_run(request)  # refuses a strength that leaves no step (A1111's rule, as for SD)
        steps_run = flow_steps_run(request.steps, strength)  # what the pipeline runs
        infotext = infotext_fields(request, "inpaint")
    else:
        prepared, inputs, mask, strength, steps_run, infotext = None, [Image.new("RGB", size, BLANK)], None, 1.0, 0, {}
    user_mask = mask is not None
    mask = mask if user_mask else Image.new("L", size, 255)
    latent_mask = masks.latent_mask(mask, (width // 8, height // 8))
    seq_len = (height // 16) * (width // 16)
    call: dict[str, Any] = {"width": width, "height": height, "strength": strength,
                            "guidance_scale": request.cfg_scale}

    def batch_kwargs(batch_index: int, _seeds: list[int], noise: torch.Tensor) -> dict[str, Any]:
        images = [inputs[(batch_index * batch + i) % len(inputs)] for i in range(batch)]
        kwargs: dict[str, Any] = {"image": images, "mask_image": [mask] * batch}
        if strength < 1:
            pixels = pipe.image_processor.preprocess(images, height=height, width=width)
            latents = encode_latents(pipe.vae, pixels).to(noise.dtype)
            sigma = first_sigma(model.components.scheduler_config, request.steps, strength, seq_len)
            noise = start_latents(latents, noise, latent_mask.to(latents), request.inpainting_fill, sigma)
        kwargs["latents"] = pack(pipe, noise)
        return kwargs

    def finish(image: Any, index: int) -> Any:
        if not user_mask:
            return image
        if prepared.box is not None:
            full = prepared.full_size[index % len(prepared.full_size)]
            return masks.paste_back(full, image, prepared.box, prepared.full_mask)
        return masks.composite_masked(prepared.originals[index % len(prepared.originals)], image, mask)

    def repeat(kwargs: dict[str, Any]) -> dict[str, Any]:  # the pipeline does not repeat embeddings passed in
        return {k: v.repeat(batch, *([1] * (v.ndim - 1))) if isinstance(v, torch.Tensor) and v.shape[0] == 1
                else v for k, v in kwargs.items()}

    if batch > 1:
        call["num_images_per_prompt"] = 1
    return SamplingPlan(
        pipe=pipe, mode="img2img" if has_image else "txt2img", steps_run=steps_run, call_kwargs=call,
        batch_kwargs=batch_kwargs, finish=finish, infotext=infotext, prompt_schedule=False,
        info={"task": "inpaint", "sampler_name": INFOTEXT_SAMPLER[0], "scheduler": INFOTEXT_SAMPLER[1],
              "guidance": GUIDANCE[model.arch], "denoising_strength": strength},
        latent_shape=(int(pipe.vae.config.latent_channels), 2 * (height // 16), 2 * (width // 16)),
        to_vae_latents=lambda latents: unpack(pipe, latents, width, height),
        decode=lambda p, latents: vae_decode(p, unpack(p, latents, width, height)),
        make_scheduler=lambda _seed: flow_scheduler(model.components.scheduler_config),
        sampler_label=INFOTEXT_SAMPLER, conditioning=repeat if batch > 1 else None,
    )
