"""Cheap live previews: latent -> RGB through a per-architecture 4x3 linear map (no VAE).

This is A1111's "Approx cheap" preview: ``rgb = latent . factors (+ bias)``, mapped to 0..255 with
``clamp((x + 1) / 2)``.  One latent pixel becomes one RGB pixel, so the result is 1/8 of the image
size; it is scaled back up 8x with nearest-neighbour so it is visible in the UI.  A batch is tiled
into a grid the way A1111 lays out its image grids (rows = round(sqrt(n))).

The caller passes the latents to show (the pipeline's current latents or its x0 estimate); they
are the *scaled* latents the UNet works on, which is what the factors were fitted to.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np
import torch
from PIL import Image

from webui.types import Arch

UPSCALE = 8  # latent pixels -> image pixels


@dataclass(frozen=True)
class LatentRGB:
    """Rows are latent channels, columns are R, G, B."""

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def channels(self) -> int:
        return len(self.factors)


SD1_FACTORS = LatentRGB(
    factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    )
)
SDXL_FACTORS = LatentRGB(
    factors=(
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    bias=(0.1084, -0.0175, -0.0011),
)

# SD2 shares the SD1 VAE; the SDXL refiner shares the SDXL VAE.
PREVIEW_FACTORS: Mapping[Arch, LatentRGB] = MappingProxyType({
    Arch.SD1: SD1_FACTORS,
    Arch.SD2: SD1_FACTORS,
    Arch.SDXL: SDXL_FACTORS,
    Arch.SDXL_REFINER: SDXL_FACTORS,
})


def should_preview(step: int, every: int, total: int | None = None) -> bool:
    """Whether 1-based ``step`` gets a preview when previews come every ``every`` steps (0 = never).
    The last step is left out: the decoded image follows it anyway."""
    if every <= 0 or step <= 0:
        return False
    if total is not None and step >= total:
        return False
    return step % every == 0


def factors_for(arch: Arch | str) -> LatentRGB:
    try:
        return PREVIEW_FACTORS[Arch(arch)]
    except (KeyError, ValueError):
        known = ", ".join(a.value for a in PREVIEW_FACTORS)
        raise ValueError(f"no latent preview factors for architecture {arch!r}; known: {known}") from None


def latent_to_rgb(latents: torch.Tensor, arch: Arch | str) -> torch.Tensor:
    """(B, C, h, w) or (C, h, w) latents -> (B, h, w, 3) float RGB in 0..1."""
    table = factors_for(arch)
    x = latents.detach().to(device="cpu", dtype=torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != table.channels:
        raise ValueError(
            f"latent preview expects (batch, {table.channels}, h, w) latents for {Arch(arch).value}, "
            f"got shape {tuple(latents.shape)}"
        )
    factors = torch.tensor(table.factors, dtype=torch.float32)
    bias = torch.tensor(table.bias, dtype=torch.float32)
    rgb = torch.einsum("bchw,cr->bhwr", x, factors) + bias
    rgb = torch.nan_to_num(rgb, nan=0.0, posinf=1.0, neginf=-1.0)
    return ((rgb + 1.0) / 2.0).clamp(0.0, 1.0)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, cols) for ``count`` tiles, A1111 style."""
    rows = min(count, max(1, round(math.sqrt(count))))
    return rows, math.ceil(count / rows)


def latent_preview(latents: torch.Tensor, arch: Arch | str, *, upscale: int = UPSCALE) -> Image.Image:
    """A PIL RGB preview of ``latents``; a batch is tiled into a grid."""
    rgb = latent_to_rgb(latents, arch)
    pixels = (rgb * 255.0).round().to(torch.uint8).numpy()  # (B, h, w, 3)
    count, h, w, _ = pixels.shape
    rows, cols = grid_shape(count)
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i in range(count):
        r, c = divmod(i, cols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = pixels[i]
    image = Image.fromarray(canvas)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    return image
