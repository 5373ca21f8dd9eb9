"""A1111 soft inpainting: the blurred mask as continuous weights instead of a binary mask (pure functions).

Written after the formulas of A1111's ``extensions-builtin/soft-inpainting/scripts/soft_inpainting.py``
(built in since 1.8); ``SoftInpaint`` (``webui.image_requests``) holds the six settings.  ``mask`` below is
the blurred inpaint mask at latent resolution, not rounded (A1111 ``nmask``: 1 = generate, 0 = keep).

1. Every step (``blend_step``): the latents are mixed with the original latents noised to the current level,
   with the weight ``mask ** (sigma ** schedule_bias * preservation_strength)`` for the generated side
   (``step_weight``).  ``sigma`` is the noise level of the step just taken, so partially masked latents keep
   the original early (large sigma: large exponent, small weight) and follow the model late.  Fully masked
   latents (1) are always generated, unmasked ones (0) always the original.  The mix interpolates the
   vectors' lengths separately (``latent_blend``): the length is the power mean with exponent
   ``transition_contrast_boost``, which keeps partially masked regions from losing contrast.  Weights of
   exactly 0 and 1 return the inputs exactly, so unmasked latents stay the original's bit for bit.
2. After sampling (``difference_mask``): how far the result moved from the original latents, smoothed by two
   weighted-percentile filters (``weighted_percentile_filter``), becomes the per-pixel weight of the
   generated image: ``1 - smootherstep(1 / (1 + (distance / half) ** difference_contrast))`` where ``half``
   is ``difference_threshold`` scaled by the mask as ``mask_influence`` says.  Upscaled to pixels and
   blurred (radius 4), it replaces the blurred mask in the final overlay, so unchanged pixels keep the
   original exactly.  "Only masked": the weight is computed inside the crop and placed into a full-size black
   mask at the crop box (``uncrop_mask``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from webui.generation.image_prep import resize_image
from webui.image_requests import (RESIZE_AND_FILL, RESIZE_CROP_AND_RESIZE, SOFT_INPAINT_ENABLED_INFOTEXT,
                                  SOFT_INPAINT_SETTINGS, SoftInpaint)

LENGTH_EPSILON = 1e-5  # A1111 latent_blend: added to the mixed vectors' length before dividing by it
SCALAR_LIMIT = 1.00001  # A1111: mask_scalar / (1.00001 - mask_scalar)
MIN_HALF_DISTANCE = 1e-6  # a threshold of 0 would divide by zero: then any change counts as changed
FILTER_STDDEV = 1.5  # A1111 get_gaussian_kernel(stddev_radius=1.5, max_radius=2)
FILTER_RADIUS = 2
FILTER_PASSES = ((0.9, 1.0), (0.25, 0.75))  # near-maximum, then interquartile mean (percentile windows)
FILTER_MIN_WIDTH = 1.0
OVERLAY_BLUR = 4  # Gaussian radius that removes the aliasing of the upscaled latent-size weight


def _wide(tensor: torch.Tensor) -> torch.dtype:
    """float64 for the length arithmetic (lengths ** 32 overflow float32); MPS has no float64."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def step_weight(mask: torch.Tensor, sigma: float, settings: SoftInpaint) -> torch.Tensor:
    """Weight of the generated latents at noise level ``sigma``: ``mask ** (sigma ** bias * strength)``."""
    exponent = (float(sigma) ** settings.schedule_bias) * settings.preservation_strength
    return torch.pow(mask, exponent)


def latent_blend(original: torch.Tensor, generated: torch.Tensor, weight: torch.Tensor,
                 contrast_boost: float) -> torch.Tensor:
    """``original * (1 - weight) + generated * weight`` per latent vector (dim 1), rescaled to the power mean
    of the two lengths: ``((1 - weight) * |original| ** p + weight * |generated| ** p) ** (1 / p)``, p =
    ``contrast_boost``.  ``weight`` is (1 or B, 1, h, w)."""
    weight = weight.to(device=generated.device)
    mixed = original.to(generated.dtype) * (1 - weight.to(generated.dtype)) + generated * weight.to(generated.dtype)
    wide = _wide(mixed)
    w = weight.to(wide)
    length = torch.linalg.vector_norm(mixed, dim=1, keepdim=True).to(wide) + LENGTH_EPSILON
    power = float(contrast_boost)
    original_length = torch.linalg.vector_norm(original, dim=1, keepdim=True).to(wide)
    generated_length = torch.linalg.vector_norm(generated, dim=1, keepdim=True).to(wide)
    wanted = (original_length.pow(power) * (1 - w) + generated_length.pow(power) * w).pow(1 / power)
    blended = mixed * (wanted / length).to(mixed.dtype)
    # weights of exactly 0 / 1 give the inputs back exactly (A1111 shrinks them by the epsilon, ~1e-5)
    blended = torch.where(weight == 0, original.to(blended.dtype), blended)
    return torch.where(weight == 1, generated, blended)


def blend_step(background: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor, sigma: float,
               settings: SoftInpaint) -> torch.Tensor:
    """One step's soft blend: the latents mixed with the noised original ``background``."""
    weight = step_weight(mask.to(device=latents.device, dtype=torch.float32), sigma, settings)
    return latent_blend(background, latents, weight, settings.transition_contrast_boost)


def scheduler_position(scheduler: Any, step: int, steps_run: int) -> int:
    """Index into ``scheduler.timesteps`` / ``sigmas`` of the step the pipeline has just taken."""
    index = getattr(scheduler, "step_index", None)
    if index is not None:
        return max(int(index) - 1, 0)
    return max(len(scheduler.timesteps) - steps_run + step, 0)  # schedulers without a step index (DDIM...)


def step_sigma(scheduler: Any, position: int) -> float:
    """Noise level (k-diffusion sigma) at ``position``: the scheduler's ``sigmas`` when it has them, else from
    ``alphas_cumprod`` at the timestep, ``sqrt((1 - a) / a)``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and 0 <= position < len(sigmas):
        return float(sigmas[position])
    timesteps = scheduler.timesteps
    timestep = int(timesteps[min(position, len(timesteps) - 1)])
    alpha = float(scheduler.alphas_cumprod[timestep])
    return math.sqrt((1 - alpha) / alpha)


def gaussian_kernel(stddev: float = FILTER_STDDEV, radius: int = FILTER_RADIUS) -> np.ndarray:
    """(2r+1, 2r+1) Gaussian weights, 1 at the centre, shifted and rescaled to reach 0 one pixel past ``radius``."""
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    zero = math.exp(-((radius + 1.0) ** 2) / stddev ** 2)
    return np.maximum((np.exp(-squared / stddev ** 2) - zero) / (1 - zero), 0.0)


def weighted_percentile_filter(image: np.ndarray, kernel: np.ndarray, low: float, high: float,
                               min_width: float = FILTER_MIN_WIDTH) -> np.ndarray:
    """A1111 ``weighted_histogram_filter``, vectorised: per pixel, the window's values sorted and stacked
    with their kernel weights (pixels outside the image left out); the mean of the part of the stack
    between ``low`` and ``high`` of its height (at least ``min_width`` weight units tall), each value
    weighted by how much of it lies in that part.  (0.9, 1): a soft maximum; (0.25, 0.75): a soft median."""
    image = np.asarray(image, dtype=np.float64)
    radius = kernel.shape[0] // 2
    size = kernel.shape
    values = np.lib.stride_tricks.sliding_window_view(np.pad(image, radius), size)
    inside = np.lib.stride_tricks.sliding_window_view(np.pad(np.ones_like(image), radius), size)
    values = values.reshape(*image.shape, -1)
    weights = (inside * kernel).reshape(*image.shape, -1)
    order = np.argsort(values, axis=-1, kind="stable")
    values = np.take_along_axis(values, order, axis=-1)
    weights = np.take_along_axis(weights, order, axis=-1)
    top = np.cumsum(weights, axis=-1)
    bottom = top - weights
    total = top[..., -1:]
    lo, hi = total * low, total * high
    narrow = (hi - lo) < min_width
    centre = (lo + hi) / 2
    lo = np.where(narrow, centre - min_width / 2, lo)
    hi = np.where(narrow, centre + min_width / 2, hi)
    over = narrow & (hi > total)
    lo, hi = np.where(over, total - min_width, lo), np.where(over, total, hi)
    under = narrow & (lo < 0)
    lo, hi = np.where(under, 0.0, lo), np.where(under, min_width, hi)
    overlap = np.clip(np.minimum(hi, top) - np.maximum(lo, bottom), 0.0, None)
    weight_sum = overlap.sum(axis=-1)
    summed = (values * overlap).sum(axis=-1)
    return np.where(weight_sum > 0, summed / np.where(weight_sum > 0, weight_sum, 1.0), 0.0)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """Perlin's smootherstep on 0..1: 6x^5 - 15x^4 + 10x^3."""
    return x * x * x * (x * (6 * x - 15) + 10)


def half_change_distance(mask: np.ndarray, settings: SoftInpaint) -> np.ndarray:
    """Latent distance at which the original keeps 50 % opacity, per latent pixel (A1111 ``mask_scalar``)."""
    scalar = 1 - np.clip(mask, 0, 1) ** (settings.preservation_strength / 2)
    scalar = 0.5 * (1 - settings.mask_influence) + scalar * settings.mask_influence
    scalar = scalar / (SCALAR_LIMIT - scalar)
    return np.maximum(settings.difference_threshold * scalar, MIN_HALF_DISTANCE)


def change_weight(distance: np.ndarray, mask: np.ndarray, settings: SoftInpaint) -> np.ndarray:
    """Weight of the generated image (0..1) from a filtered latent distance map and the mask (same shape)."""
    ratio = np.asarray(distance, dtype=np.float64) / half_change_distance(np.asarray(mask, np.float64), settings)
    keep = smootherstep(1 / (1 + ratio ** settings.difference_contrast))
    return np.clip(1 - keep, 0.0, 1.0)


def latent_distance(original: torch.Tensor, generated: torch.Tensor) -> np.ndarray:
    """Length of ``generated - original`` per latent pixel for one image's (C, h, w) latents."""
    difference = generated.detach().float().cpu() - original.detach().float().cpu()
    return torch.linalg.vector_norm(difference, dim=0).numpy().astype(np.float64)


def difference_mask(mask: torch.Tensor, original: torch.Tensor, generated: torch.Tensor, settings: SoftInpaint,
                    size: tuple[int, int]) -> Image.Image:
    """The overlay mask ("L", ``size`` = (width, height); 255 = generated) of one image.

    ``mask``: the latent mask, (h, w) or (1, 1, h, w); ``original`` / ``generated``: (C, h, w) latents
    (before sampling, masked content applied / the sampled result)."""
    latent_mask = mask.detach().float().cpu().reshape(mask.shape[-2:]).numpy().astype(np.float64)
    distance = latent_distance(original, generated)
    kernel = gaussian_kernel()
    for low, high in FILTER_PASSES:
        distance = weighted_percentile_filter(distance, kernel, low, high)
    weight = change_weight(distance, latent_mask, settings)
    # rounded (A1111 truncates, so a fully changed region there keeps 1/255 of the original)
    small = Image.fromarray(np.rint(255.0 * weight).astype(np.uint8), mode="L")
    return resize_image(small, size[0], size[1], RESIZE_AND_FILL).filter(ImageFilter.GaussianBlur(OVERLAY_BLUR))


def uncrop_mask(mask: Image.Image, full_size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """An "only masked" crop's mask placed at ``box`` in a black full-size mask (A1111 ``uncrop``)."""
    x0, y0, x1, y1 = box
    full = Image.new("L", tuple(full_size), 0)
    full.paste(resize_image(mask.convert("L"), x1 - x0, y1 - y0, RESIZE_CROP_AND_RESIZE), (x0, y0))
    return full


def infotext_fields(settings: SoftInpaint) -> dict[str, Any]:
    """A1111's infotext entries: ``Soft inpainting enabled: True, Soft inpainting schedule bias: 1, ...``."""
    fields: dict[str, Any] = {SOFT_INPAINT_ENABLED_INFOTEXT: True}
    fields.update((spec.infotext, getattr(settings, spec.name)) for spec in SOFT_INPAINT_SETTINGS)
    return fields
