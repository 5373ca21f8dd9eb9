"""Soft inpainting math (``webui.generation.soft_inpaint``), its settings, infotext, API args and UI values.

Expected numbers are worked out by hand from A1111's formulas (extensions-builtin/soft-inpainting):
weight = mask ** (sigma ** schedule_bias * preservation_strength); the blended length is the power mean
of the two lengths; the overlay weight is 1 - smootherstep(1 / (1 + (d / half) ** contrast)).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from webui.api.convert_img2img import soft_inpainting, split_soft_inpainting
from webui.api.schemas import Img2ImgRequest as ApiImg2Img
from webui.generation import soft_inpaint as si
from webui.generation.masks import composite_masked
from webui.image_requests import Img2ImgRequest, SoftInpaint
from webui.io.metadata import build_infotext, infotext_to_request_fields, parse_infotext, soft_inpaint_from_infotext
from webui.types import Arch, RequestError, Variant
from webui.ui.img2img_requests import image_fields, infotext_values

DEFAULT = SoftInpaint()
MASK = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]).reshape(1, 1, 1, 7)


# --- per-step weights ----------------------------------------------------------------------------------
def test_defaults_are_a1111s():
    assert (DEFAULT.schedule_bias, DEFAULT.preservation_strength, DEFAULT.transition_contrast_boost,
            DEFAULT.mask_influence, DEFAULT.difference_threshold, DEFAULT.difference_contrast) == (1, 0.5, 4, 0, 0.5, 2)


def test_step_weight_by_hand():
    # sigma 2, bias 1, strength 0.5: exponent 1 -> the mask itself
    assert torch.allclose(si.step_weight(MASK, 2.0, DEFAULT), MASK)
    # sigma 4, bias 2, strength 0.5: exponent 8 -> 0.5 ** 8
    weight = si.step_weight(MASK, 4.0, SoftInpaint(schedule_bias=2.0))
    assert weight[0, 0, 0, 3].item() == pytest.approx(0.5 ** 8)
    assert weight[0, 0, 0, 4].item() == pytest.approx(0.75 ** 8)


def test_edge_weights_are_between_0_and_1_and_monotone_in_the_mask():
    for sigma in (14.6, 3.0, 1.0, 0.3, 0.03):
        weight = si.step_weight(MASK, sigma, DEFAULT).flatten()
        assert weight[0] == 0 and weight[-1] == 1  # unmasked: original; fully masked: generated
        assert ((weight[1:-1] > 0) & (weight[1:-1] < 1)).all()
        assert (weight[1:] > weight[:-1]).all()


def test_high_noise_keeps_the_original_and_low_noise_follows_the_model():
    early = si.step_weight(MASK, 14.6, DEFAULT)[0, 0, 0, 3].item()  # 0.5 ** 7.3
    late = si.step_weight(MASK, 0.03, DEFAULT)[0, 0, 0, 3].item()  # 0.5 ** 0.015
    assert early == pytest.approx(0.5 ** 7.3) and late == pytest.approx(0.5 ** 0.015)


def test_schedule_bias_and_preservation_strength_act_as_the_formula_says():
    half = MASK[..., 3:4]
    # bias 0: sigma no longer matters (exponent = strength)
    for sigma in (0.1, 1.0, 10.0):
        assert si.step_weight(half, sigma, SoftInpaint(schedule_bias=0)).item() == pytest.approx(0.5 ** 0.5)
    # above sigma 1 a larger bias preserves more (smaller weight), below sigma 1 less
    assert si.step_weight(half, 5.0, SoftInpaint(schedule_bias=2)) < si.step_weight(half, 5.0, DEFAULT)
    assert si.step_weight(half, 0.5, SoftInpaint(schedule_bias=2)) > si.step_weight(half, 0.5, DEFAULT)
    # a larger preservation strength preserves more at every noise level
    assert si.step_weight(half, 1.0, SoftInpaint(preservation_strength=2)).item() == pytest.approx(0.25)
    # strength 0: the latents are not preserved at all (A1111: x ** 0 == 1, even where the mask is 0)
    assert torch.equal(si.step_weight(MASK, 3.0, SoftInpaint(preservation_strength=0)), torch.ones_like(MASK))


# --- latent blend ----------------------------------------------------------------------------------------
def vectors(*rows):
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, 4, 1, len(rows))


def test_latent_blend_by_hand():
    a, b = vectors([3, 0, 0, 0]), vectors([0, 4, 0, 0])
    half = torch.full((1, 1, 1, 1), 0.5)
    # p = 1: mixed (1.5, 2) has length 2.5, the wanted length 0.5 * 3 + 0.5 * 4 = 3.5
    out = si.latent_blend(a, b, half, 1.0).flatten()
    assert out[:2].tolist() == pytest.approx([1.5 * 3.5 / (2.5 + 1e-5), 2 * 3.5 / (2.5 + 1e-5)], rel=1e-6)
    # p = 4: wanted ((3^4 + 4^4) / 2) ** (1/4)
    out = si.latent_blend(a, b, half, 4.0).flatten()
    assert torch.linalg.vector_norm(out).item() == pytest.approx(168.5 ** 0.25 * 2.5 / (2.5 + 1e-5), rel=1e-6)


def test_latent_blend_ends_and_contrast_boost():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 3, 5, generator=generator), torch.randn(2, 4, 3, 5, generator=generator)
    assert torch.equal(si.latent_blend(a, b, torch.zeros(1, 1, 3, 5), 4.0), a)  # exact at the ends
    assert torch.equal(si.latent_blend(a, b, torch.ones(1, 1, 3, 5), 4.0), b)
    half = torch.full((1, 1, 3, 5), 0.5)
    lengths = [torch.linalg.vector_norm(si.latent_blend(a, b, half, p), dim=1) for p in (1.0, 4.0, 32.0)]
    assert (lengths[0] <= lengths[1] + 1e-6).all() and (lengths[1] <= lengths[2] + 1e-6).all()
    # a larger boost approaches the longer of the two vectors
    longest = torch.maximum(torch.linalg.vector_norm(a, dim=1), torch.linalg.vector_norm(b, dim=1))
    assert (lengths[2] <= longest + 1e-4).all()


def test_blend_step_keeps_unmasked_latents_and_generates_masked_ones():
    background, latents = torch.randn(1, 4, 1, 7), torch.randn(1, 4, 1, 7)
    out = si.blend_step(background, latents, MASK, 5.0, DEFAULT)
    assert torch.equal(out[..., 0], background[..., 0]) and torch.equal(out[..., -1], latents[..., -1])
    # partially masked latents lie between: at sigma 5 mostly the original (weight 0.5 ** 2.5 = 0.177)
    middle = out[..., 3]
    assert (middle - background[..., 3]).norm() < (middle - latents[..., 3]).norm()


# --- noise level of a step -------------------------------------------------------------------------------
def test_step_sigma_from_sigmas_or_alphas():
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    euler.set_timesteps(10)
    assert si.step_sigma(euler, 0) == pytest.approx(float(euler.sigmas[0]))
    assert si.step_sigma(euler, 0) == pytest.approx(14.6, abs=0.1)  # SD's sigma_max
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ddim.set_timesteps(10)
    alpha = float(ddim.alphas_cumprod[int(ddim.timesteps[3])])
    assert si.step_sigma(ddim, 3) == pytest.approx(math.sqrt((1 - alpha) / alpha))
    # without a step index the position comes from the step: the last steps_run timesteps are run
    assert si.scheduler_position(ddim, 0, 4) == 6
    assert si.scheduler_position(SimpleNamespace(step_index=5, timesteps=[0] * 10), 2, 4) == 4


# --- percentile filters ----------------------------------------------------------------------------------
def test_gaussian_kernel_by_hand():
    kernel = si.gaussian_kernel()
    zero = math.exp(-9 / 2.25)
    assert kernel.shape == (5, 5) and kernel[2, 2] == pytest.approx(1.0)
    assert kernel[0, 0] == pytest.approx((math.exp(-8 / 2.25) - zero) / (1 - zero))
    assert kernel[2, 0] == pytest.approx((math.exp(-4 / 2.25) - zero) / (1 - zero))


def reference_filter(image, kernel, low, high, min_width=1.0):
    """A1111's weighted histogram filter, pixel by pixel (the loop the vectorised one must match)."""
    height, width = image.shape
    radius = kernel.shape[0] // 2
    out = np.zeros_like(image)
    for y in range(height):
        for x in range(width):
            items = sorted((image[y + dy, x + dx], kernel[dy + radius, dx + radius])
                           for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)
                           if 0 <= y + dy < height and 0 <= x + dx < width)
            total = sum(w for _, w in items)
            lo, hi = total * low, total * high
            if hi - lo < min_width:
                centre = (lo + hi) / 2
                lo, hi = centre - min_width / 2, centre + min_width / 2
                if hi > total:
                    lo, hi = total - min_width, total
                if lo < 0:
                    lo, hi = 0, min_width
            start, num, den = 0.0, 0.0, 0.0
            for value, weight in items:
                part = min(hi, start + weight) - max(lo, start)
                if part > 0:
                    num, den = num + value * part, den + part
                start += weight
            out[y, x] = num / den if den else 0
    return out


@pytest.mark.parametrize("window", [(0.9, 1.0), (0.25, 0.75), (0.0, 0.05)])
def test_percentile_filter_matches_the_pixel_loop(window):
    image = np.random.default_rng(1).random((7, 9)) * 3
    kernel = si.gaussian_kernel()
    np.testing.assert_allclose(si.weighted_percentile_filter(image, kernel, *window),
                               reference_filter(image, kernel, *window), atol=1e-12)


def test_percentile_filter_near_max_spreads_a_spike():
    image = np.zeros((9, 9))
    image[4, 4] = 2.0
    out = si.weighted_percentile_filter(image, si.gaussian_kernel(), 0.9, 1.0)
    assert out[4, 4] == pytest.approx(2.0) and out[4, 3] > 0.5 and out[0, 0] == 0
    flat = np.full((6, 6), 0.7)
    np.testing.assert_allclose(si.weighted_percentile_filter(flat, si.gaussian_kernel(), 0.25, 0.75), flat)


# --- overlay weights -------------------------------------------------------------------------------------
def test_change_weight_by_hand():
    half = 0.5 * 0.5 / (1.00001 - 0.5)  # mask influence 0: threshold * 0.5 / 0.50001 everywhere
    distances = np.array([0.0, half, 100.0])
    weight = si.change_weight(distances, np.array([0.0, 0.5, 1.0]), DEFAULT)
    assert weight.tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1e-6)  # smootherstep(0.5) = 0.5
    # d = 2 * half, contrast 2: 1 / (1 + 4) = 0.2 -> smootherstep(0.2) = 0.05792
    assert si.change_weight(np.array([2 * half]), np.array([0.3]), DEFAULT)[0] == pytest.approx(1 - 0.05792)
    # mask influence 1: the unmasked side tolerates any change, the fully masked side none
    follow = SoftInpaint(mask_influence=1.0)
    assert si.change_weight(np.array([0.5, 0.001]), np.array([0.0, 1.0]), follow).tolist() == \
        pytest.approx([0.0, 1.0], abs=1e-6)


def test_difference_composite_keeps_unchanged_pixels_and_takes_changed_ones():
    original = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(2))
    generated = original.clone()
    generated[:, :, :6] += 3.0  # the left 6 latent columns changed a lot
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1.0
    weight = si.difference_mask(mask, original, generated, DEFAULT, (128, 128))
    values = np.asarray(weight)
    assert weight.size == (128, 128) and weight.mode == "L"
    assert values[:, :24].min() == 255 and values[:, 90:].max() == 0
    old = Image.fromarray(np.random.default_rng(3).integers(0, 256, (128, 128, 3), np.uint8))
    new = Image.fromarray(np.random.default_rng(4).integers(0, 256, (128, 128, 3), np.uint8))
    out = np.asarray(composite_masked(old, new, weight))
    assert np.array_equal(out[:, :24], np.asarray(new)[:, :24])  # weight 1: generated
    assert np.array_equal(out[:, 90:], np.asarray(old)[:, 90:])  # weight 0: original


def test_unchanged_latents_keep_every_original_pixel():
    latents = torch.randn(4, 8, 8)
    weight = si.difference_mask(torch.ones(1, 1, 8, 8), latents, latents.clone(), DEFAULT, (64, 64))
    assert np.asarray(weight).max() == 0


def test_uncrop_mask_places_the_crop_at_its_box():
    full = si.uncrop_mask(Image.new("L", (32, 32), 255), (100, 80), (10, 20, 42, 52))
    values = np.asarray(full)
    assert full.size == (100, 80)
    assert values[20:52, 10:42].min() == 255 and values.sum() == 255 * 32 * 32


# --- settings, infotext, API args, UI values -------------------------------------------------------------
def test_settings_are_validated_with_a1111_ranges():
    with pytest.raises(RequestError, match="transition contrast boost must be between 1 and 32, got 0.5"):
        SoftInpaint(transition_contrast_boost=0.5)
    with pytest.raises(RequestError, match="mask influence must be between 0 and 1"):
        SoftInpaint(mask_influence=2)
    with pytest.raises(RequestError, match="schedule bias must be a number"):
        SoftInpaint(schedule_bias="high")
    with pytest.raises(RequestError, match="soft_inpainting must be SoftInpaint"):
        Img2ImgRequest(init_images=[Image.new("RGB", (64, 64))], soft_inpainting={"schedule_bias": 1})


def test_infotext_writes_a1111_keys_and_reads_them_back():
    settings = SoftInpaint(schedule_bias=1.5, transition_contrast_boost=8, difference_contrast=3.25)
    fields = si.infotext_fields(settings)
    assert list(fields) == ["Soft inpainting enabled", "Soft inpainting schedule bias",
                            "Soft inpainting preservation strength", "Soft inpainting transition contrast boost",
                            "Soft inpainting mask influence", "Soft inpainting difference threshold",
                            "Soft inpainting difference contrast"]
    text = build_infotext("a cat", "", {"Steps": 20, "Denoising strength": 0.75, **fields})
    assert "Soft inpainting enabled: True, Soft inpainting schedule bias: 1.5," in text
    parsed = parse_infotext(text)
    assert soft_inpaint_from_infotext(parsed) == settings
    assert infotext_to_request_fields(parsed)["soft_inpainting"] == settings


def test_infotext_without_or_with_bad_soft_inpainting():
    assert "soft_inpainting" not in infotext_to_request_fields(parse_infotext("cat\nSteps: 20"))
    partial = parse_infotext("cat\nSteps: 20, Soft inpainting enabled: True, Soft inpainting mask influence: x")
    assert soft_inpaint_from_infotext(partial) == DEFAULT  # unreadable -> default, as the UI keeps its value
    out_of_range = parse_infotext("cat\nSoft inpainting enabled: True, Soft inpainting mask influence: 5")
    assert soft_inpaint_from_infotext(out_of_range) is None


def test_api_script_args_in_a1111_order():
    assert soft_inpainting({"args": [True, 1.5, 0.75, 8, 0.25, 1, 3]}) == SoftInpaint(
        schedule_bias=1.5, preservation_strength=0.75, transition_contrast_boost=8, mask_influence=0.25,
        difference_threshold=1, difference_contrast=3)
    assert soft_inpainting({"args": [True]}) == DEFAULT  # missing args take A1111's defaults
    assert soft_inpainting({"args": [False, 2, 2, 2, 0, 1, 1]}) is None
    assert soft_inpainting({"args": []}) is None
    with pytest.raises(RequestError, match=r"args\[3\] \(Transition contrast boost\) must be a number"):
        soft_inpainting({"args": [True, 1, 0.5, "lots"]})
    with pytest.raises(RequestError, match=r"transition contrast boost must be between 1 and 32"):
        soft_inpainting({"args": [True, 1, 0.5, 0]})
    with pytest.raises(RequestError, match="must be a list"):
        soft_inpainting({"args": {"enabled": True}})


def test_api_body_split_matches_the_script_title_in_any_case():
    body = ApiImg2Img(alwayson_scripts={"Soft Inpainting": {"args": [True, 2]}, "controlnet": {"args": []}})
    rest, settings = split_soft_inpainting(body)
    assert settings == SoftInpaint(schedule_bias=2) and list(rest.alwayson_scripts) == ["controlnet"]
    from_infotext = ApiImg2Img(infotext="cat\nSteps: 4, Soft inpainting enabled: True, "
                                        "Soft inpainting difference threshold: 2")
    assert split_soft_inpainting(from_infotext)[1] == SoftInpaint(difference_threshold=2)


def test_ui_widget_values_become_settings_and_back():
    values = {"soft_inpainting": True, "soft_schedule_bias": 2, "soft_difference_contrast": "4"}
    settings = image_fields(values, inpaint=True)["soft_inpainting"]
    assert settings == SoftInpaint(schedule_bias=2, difference_contrast=4)
    assert image_fields({"soft_inpainting": False, "soft_schedule_bias": 2}, inpaint=True)["soft_inpainting"] is None
    with pytest.raises(RequestError, match="Soft inpainting mask influence must be a number"):
        image_fields({"soft_inpainting": True, "soft_mask_influence": "x"}, inpaint=True)
    widgets = infotext_values({"soft_inpainting": settings})
    assert widgets["soft_inpainting"] is True and widgets["soft_schedule_bias"] == 2
    assert "soft_inpainting" not in infotext_values({"steps": 20})


def test_dit_models_refuse_soft_inpainting():
    from webui.generation.dit import check_request

    flux_fill = SimpleNamespace(arch=Arch.FLUX, components=SimpleNamespace(variant=Variant.INPAINT))
    request = Img2ImgRequest(init_images=[Image.new("RGB", (64, 64))], mask=Image.new("L", (64, 64), 255),
                             sampler="Euler", schedule="Simple", soft_inpainting=DEFAULT)
    with pytest.raises(RequestError, match="soft inpainting is not supported for Flux models yet: turn Soft "
                                           "inpainting off"):
        check_request(flux_fill, request)
