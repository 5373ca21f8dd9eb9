import pytest
import torch

from webui.generation import previews
from webui.types import Arch


def test_single_latent_size_and_mode():
    img = previews.latent_preview(torch.zeros(1, 4, 8, 6), Arch.SD1)
    assert img.mode == "RGB"
    assert img.size == (6 * 8, 8 * 8)  # width, height; 8x nearest upscale


def test_three_dim_latent_accepted():
    assert previews.latent_preview(torch.zeros(4, 2, 2), "sd1").size == (16, 16)


def test_known_latent_gives_hand_computed_color_sd1():
    latent = torch.zeros(1, 4, 2, 2)
    latent[:, 0] = 1.0  # only channel 0: rgb = row 0 = (.3512, .2297, .3227)
    img = previews.latent_preview(latent, Arch.SD1)
    expected = tuple(round((v + 1) / 2 * 255) for v in (0.3512, 0.2297, 0.3227))
    assert img.getpixel((0, 0)) == expected == (172, 157, 169)
    assert img.getpixel((15, 15)) == expected


def test_known_latent_sdxl_uses_bias_and_clamps():
    latent = torch.zeros(1, 4, 1, 1)
    latent[:, 3] = -4.0  # rgb = -4 * (-.3165, -.2492, -.2188) + bias = (1.3744, .9793, .8741)
    img = previews.latent_preview(latent, Arch.SDXL)
    assert img.getpixel((0, 0)) == (255, 252, 239)
    zero = previews.latent_preview(torch.zeros(1, 4, 1, 1), Arch.SDXL_REFINER)
    assert zero.getpixel((0, 0)) == tuple(round((b + 1) / 2 * 255) for b in (0.1084, -0.0175, -0.0011))


def test_sd2_shares_sd1_factors():
    latent = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    assert previews.latent_preview(latent, Arch.SD1).tobytes() == previews.latent_preview(latent, Arch.SD2).tobytes()


def test_batch_is_tiled_into_grid():
    latents = torch.zeros(3, 4, 2, 3)
    latents[1, 0] = 1.0
    img = previews.latent_preview(latents, Arch.SD1)
    assert previews.grid_shape(3) == (2, 2)
    assert img.size == (2 * 3 * 8, 2 * 2 * 8)
    assert img.getpixel((3 * 8, 0)) == (172, 157, 169)  # second tile, top right
    assert img.getpixel((0, 0)) == (128, 128, 128)
    assert img.getpixel((3 * 8, 2 * 8)) == (0, 0, 0)  # empty fourth cell
    assert previews.grid_shape(2) == (1, 2)
    assert previews.grid_shape(4) == (2, 2)


def test_half_precision_and_bad_input():
    assert previews.latent_preview(torch.zeros(1, 4, 2, 2, dtype=torch.float16), Arch.SDXL).size == (16, 16)
    with pytest.raises(ValueError, match="16"):
        previews.latent_preview(torch.zeros(1, 16, 2, 2), Arch.SDXL)
    with pytest.raises(ValueError, match="architecture"):
        previews.latent_preview(torch.zeros(1, 4, 2, 2), Arch.UNKNOWN)


def test_should_preview():
    assert [s for s in range(1, 11) if previews.should_preview(s, 3, 10)] == [3, 6, 9]
    assert not previews.should_preview(5, 0, 10)
    assert not previews.should_preview(10, 1, 10)
