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

# 16-channel DiT latents (scaled/normalised model-space latents, as the transformer sees them after
# unpacking); public least-squares fits, as in ComfyUI's comfy/latent_formats.py (SD3, Flux, Wan 2.1).
SD3_FACTORS = LatentRGB(
    factors=(
        (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
    ),
    bias=(0.2394, 0.2135, 0.1925),
)
FLUX_FACTORS = LatentRGB(
    factors=(
        (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
    ),
    bias=(-0.0329, -0.0718, -0.0851),
)
QWEN_IMAGE_FACTORS = LatentRGB(  # Qwen-Image uses the Wan 2.1 VAE (mean/std-normalised latents)
    factors=(
        (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
    ),
    bias=(-0.1835, -0.0868, -0.3360),
)

# SD2 shares the SD1 VAE; the SDXL refiner shares the SDXL VAE.
PREVIEW_FACTORS: Mapping[Arch, LatentRGB] = MappingProxyType({
    Arch.SD1: SD1_FACTORS,
    Arch.SD2: SD1_FACTORS,
    Arch.SDXL: SDXL_FACTORS,
    Arch.SDXL_REFINER: SDXL_FACTORS,
    Arch.SD3: SD3_FACTORS,
    Arch.FLUX: FLUX_FACTORS,
    Arch.QWEN_IMAGE: QWEN_IMAGE_FACTORS,
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
