"""Inpaint mask helpers: reading masks and editor values, preparing, crop geometry, fill, paste back."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from webui.generation.image_prep import resize_image
from webui.generation.masks import (EMPTY_MASK_MESSAGE, composite_masked, crop_for_generation, crop_region,
                                    editor_to_image_and_mask, expand_to_aspect, fill_masked, latent_mask,
                                    mask_from_any, overlay_mask, paste_back, prepare_mask)
from webui.types import RequestError


def noise(width, height, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8))


def rect_mask(size, box, value=255):
    mask = Image.new("L", size, 0)
    mask.paste(value, box)
    return mask


def arr(image):
    return np.asarray(image).astype(int)


# --- mask_from_any ---------------------------------------------------------------------------------

def test_alpha_mask_uses_alpha_and_rounds_it():
    pixels = np.zeros((4, 4, 4), np.uint8)  # black everywhere: luminance would say "nothing"
    pixels[0, 0, 3] = 255
    pixels[0, 1, 3] = 200
    pixels[0, 2, 3] = 100
    mask = mask_from_any(Image.fromarray(pixels, "RGBA"))
    assert mask.mode == "L"
    assert arr(mask)[0, :4].tolist() == [255, 255, 0, 0]


def test_opaque_rgba_and_rgb_use_luminance():
    pixels = np.full((2, 2, 4), 255, np.uint8)
    pixels[0, 0, :3] = 0
    assert arr(mask_from_any(Image.fromarray(pixels, "RGBA"))).tolist() == [[0, 255], [255, 255]]
    assert arr(mask_from_any(Image.new("RGB", (2, 2), (255, 255, 255)))).min() == 255
    grey = mask_from_any(Image.new("L", (2, 2), 100))
    assert arr(grey).tolist() == [[100, 100], [100, 100]]  # soft values kept; prepare_mask binarises


def test_array_masks():
    boolean = np.zeros((3, 5), bool)
    boolean[1, 2] = True
    mask = mask_from_any(boolean)
    assert mask.size == (5, 3) and arr(mask)[1, 2] == 255 and arr(mask).sum() == 255
    assert arr(mask_from_any(np.array([[0.0, 1.0]], np.float32))).tolist() == [[0, 255]]


# --- editor values ---------------------------------------------------------------------------------

def editor_value(background, stroke_box, *, as_numpy=True, extra_empty_layer=True):
    width, height = background.size
    stroke = np.zeros((height, width, 4), np.uint8)
    x0, y0, x1, y1 = stroke_box
    stroke[y0:y1, x0:x1] = (255, 255, 255, 255)
    stroke[y0:y1, x1] = (255, 255, 255, 90)  # a faint anti-aliased edge: below the threshold
    layers = [stroke] + ([np.zeros_like(stroke)] if extra_empty_layer else [])
    bg = np.asarray(background.convert("RGBA"))
    if not as_numpy:
        layers = [Image.fromarray(layer, "RGBA") for layer in layers]
        bg = background.convert("RGBA")
    return {"background": bg, "layers": layers, "composite": bg}


@pytest.mark.parametrize("as_numpy", [True, False])
def test_editor_stroke_layer_is_the_mask(as_numpy):
    background = noise(64, 48)
    image, mask = editor_to_image_and_mask(editor_value(background, (10, 5, 30, 20), as_numpy=as_numpy))
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(background))
    prepared = prepare_mask(mask, image.size)
    assert np.array_equal(arr(prepared) > 0, arr(rect_mask((64, 48), (10, 5, 30, 20))) > 0)


def test_editor_union_of_layers_and_layer_resized_to_the_image():
    background = noise(64, 64)
    first = np.zeros((64, 64, 4), np.uint8)
    first[0:8, 0:8, 3] = 255
    small = np.zeros((32, 32, 4), np.uint8)  # a layer at half size: resized to the image
    small[16:32, 16:32, 3] = 255
    _, mask = editor_to_image_and_mask({"background": np.asarray(background), "layers": [first, small]})
    values = arr(mask)
    assert values.shape == (64, 64)
    assert values[0:8, 0:8].min() == 255 and values[32:64, 32:64].min() == 255
    assert values[10:30, 10:30].max() == 0


def test_editor_missing_pieces():
    assert editor_to_image_and_mask(None) == (None, None)
    assert editor_to_image_and_mask({}) == (None, None)
    background = noise(16, 16)
    image, mask = editor_to_image_and_mask({"background": background, "layers": []})
    assert image is not None and mask is None
    image, mask = editor_to_image_and_mask({"background": np.zeros((16, 16, 4), np.uint8),
                                            "layers": [np.zeros((16, 16, 4), np.uint8)], "composite": None})
    assert image is None and mask is not None  # transparent canvas: nothing uploaded
    _, blank = editor_to_image_and_mask({"background": background, "layers": [np.zeros((16, 16, 4), np.uint8)]})
    with pytest.raises(RequestError) as info:
        prepare_mask(blank, (16, 16))
    assert str(info.value) == EMPTY_MASK_MESSAGE


def test_editor_transparent_background_flattened_on_white():
    pixels = np.zeros((4, 4, 4), np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)
    image, _ = editor_to_image_and_mask({"background": pixels, "layers": None})
    assert tuple(arr(image)[0, 0]) == (255, 0, 0) and tuple(arr(image)[3, 3]) == (255, 255, 255)


# --- prepare_mask ----------------------------------------------------------------------------------

def test_empty_mask_refused_with_the_message():
    with pytest.raises(RequestError) as info:
        prepare_mask(Image.new("L", (32, 32), 0), (32, 32))
    assert str(info.value) == EMPTY_MASK_MESSAGE
    with pytest.raises(RequestError, match="mask is empty"):
        prepare_mask(Image.new("L", (32, 32), 255), (32, 32), invert=True)
    with pytest.raises(RequestError, match="mask is empty"):
        prepare_mask(Image.new("L", (32, 32), 127), (32, 32))  # nothing above the threshold


def test_full_mask_is_valid_and_binarised():
    assert arr(prepare_mask(Image.new("L", (8, 8), 255), (8, 8))).min() == 255
    soft = prepare_mask(np.array([[0, 100, 128, 250]], np.uint8), (4, 1))
    assert arr(soft).tolist() == [[0, 0, 255, 255]]


def test_invert_swaps_masked_and_kept():
    mask = rect_mask((16, 16), (0, 0, 8, 16))
    inverted = arr(prepare_mask(mask, (16, 16), invert=True))
    assert inverted[:, :8].max() == 0 and inverted[:, 8:].min() == 255


def test_mask_of_another_size_is_resized():
    mask = rect_mask((32, 32), (0, 0, 16, 32))
    prepared = prepare_mask(mask, (64, 48))
    values = arr(prepared)
    assert prepared.size == (64, 48) and set(np.unique(values)) == {0, 255}
    assert values[:, :31].min() == 255 and values[:, 33:].max() == 0


def test_blur_softens_only_the_edge():
    mask = rect_mask((64, 64), (16, 16, 48, 48))
    sharp = arr(prepare_mask(mask, (64, 64)))
    blurred = arr(prepare_mask(mask, (64, 64), blur=3))
    assert set(np.unique(sharp)) == {0, 255}
    assert blurred[26:38, 26:38].min() == 255  # deep inside untouched
    assert blurred[:4].max() == 0 and blurred[:, 60:].max() == 0  # far outside untouched
    edge = blurred[32, 10:22]
    assert 0 < edge.min() < 255 or 0 < edge.max() < 255
    assert ((blurred > 0) & (blurred < 255)).sum() > 0
    assert np.all(np.diff(blurred[32, 0:32]) >= 0)  # monotonic ramp across the edge


# --- crop geometry ---------------------------------------------------------------------------------

def test_crop_region_is_the_padded_bounding_box_inside_the_image():
    mask = rect_mask((100, 80), (40, 30, 50, 35))
    assert crop_region(mask, 0) == (40, 30, 50, 35)
    assert crop_region(mask, 8) == (32, 22, 58, 43)
    assert crop_region(mask, 64) == (0, 0, 100, 80)
    with pytest.raises(RequestError, match="mask is empty"):
        crop_region(Image.new("L", (10, 10)), 4)


@pytest.mark.parametrize("box,target", [((40, 30, 50, 35), (64, 64)), ((40, 30, 50, 35), (64, 32)),
                                        ((0, 0, 10, 40), (96, 64)), ((85, 70, 100, 80), (64, 64)),
                                        ((10, 10, 20, 12), (32, 96))])
def test_expand_to_aspect_keeps_aspect_contains_box_and_stays_inside(box, target):
    image_w, image_h = 100, 80
    x0, y0, x1, y1 = expand_to_aspect(box, *target, image_w, image_h)
    assert 0 <= x0 <= box[0] and 0 <= y0 <= box[1] and box[2] <= x1 <= image_w and box[3] <= y1 <= image_h
    width, height = x1 - x0, y1 - y0
    wanted = target[0] / target[1]
    # exact up to rounding to whole pixels
    assert abs(width - height * wanted) <= 1 or abs(height - width / wanted) <= 1


def test_expand_to_aspect_clamps_when_the_image_is_too_small():
    assert expand_to_aspect((0, 10, 100, 20), 1, 1, 100, 40) == (0, 0, 100, 40)


# --- composite / paste back ------------------------------------------------------------------------

def test_round_trip_identity_generation_gives_back_the_original_exactly():
    original = noise(96, 80)
    mask = prepare_mask(rect_mask((96, 80), (30, 20, 50, 44)), (96, 80), blur=4)
    box = expand_to_aspect(crop_region(mask, 8), 64, 64, 96, 80)
    x0, y0, x1, y1 = box
    crop = crop_for_generation(original, box, x1 - x0, y1 - y0)  # identity "generation" at the box size
    result = paste_back(original, crop, box, mask)
    assert result.size == original.size
    assert np.array_equal(np.asarray(result), np.asarray(original))


def test_paste_back_changes_only_the_masked_area():
    original = noise(96, 80, seed=3)
    mask = prepare_mask(rect_mask((96, 80), (30, 20, 50, 44)), (96, 80), blur=4)
    box = expand_to_aspect(crop_region(mask, 16), 64, 64, 96, 80)
    generated = Image.new("RGB", (64, 64), (0, 255, 0))  # what the model returned for the crop
    result, before, weights = arr(paste_back(original, generated, box, mask)), arr(original), arr(mask)
    assert np.array_equal(result[weights == 0], before[weights == 0])  # unmasked: bit-identical
    assert (result[weights == 255] == (0, 255, 0)).all()  # fully masked: generated
    edge = (weights > 0) & (weights < 255)
    assert edge.any() and not np.array_equal(result[edge], before[edge])


def test_paste_back_undoes_the_fill_of_a_clamped_box():
    original = noise(100, 40, seed=4)
    mask = rect_mask((100, 40), (0, 10, 100, 20))
    box = expand_to_aspect(crop_region(mask, 0), 64, 64, 100, 40)  # 100x40 box: the image is too short
    crop = crop_for_generation(original, box, 64, 64)
    assert crop.size == (64, 64)
    generated = Image.new("RGB", (64, 64), (9, 9, 9))
    result = arr(paste_back(original, generated, box, mask))
    assert (result[10:20] == 9).all() and np.array_equal(result[:10], arr(original)[:10])


def test_composite_masked_is_exact_outside_the_mask():
    original, generated = noise(32, 32, 5), noise(32, 32, 6)
    mask = prepare_mask(rect_mask((32, 32), (8, 8, 24, 24)), (32, 32), blur=2)
    out, weights = arr(composite_masked(original, generated, mask)), arr(mask)
    assert np.array_equal(out[weights == 0], arr(original)[weights == 0])
    assert np.array_equal(out[weights == 255], arr(generated)[weights == 255])
    with pytest.raises(ValueError, match="sizes differ"):
        composite_masked(original, noise(16, 16), mask)


def test_overlay_mask_doubles_the_feather():
    doubled = arr(overlay_mask(Image.fromarray(np.array([[0, 60, 127, 128, 255]], np.uint8))))
    assert doubled.tolist() == [[0, 120, 254, 255, 255]]


# --- fill / latent mask ----------------------------------------------------------------------------

def test_fill_replaces_the_masked_area_with_surrounding_colours():
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:] = (200, 30, 30)
    pixels[20:44, 20:44] = (0, 255, 0)  # content under the mask that must disappear
    image = Image.fromarray(pixels)
    mask = rect_mask((64, 64), (16, 16, 48, 48))
    filled = arr(fill_masked(image, mask))
    inside = filled[16:48, 16:48]
    assert np.abs(inside - (200, 30, 30)).max() <= 8  # smeared in from the red surroundings
    assert inside[..., 1].max() < 60  # no green left
    outside = arr(mask) == 0
    assert np.array_equal(filled[outside], pixels[outside].astype(int))


def test_fill_blends_two_sides():
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    filled = arr(fill_masked(Image.fromarray(pixels), rect_mask((64, 32), (24, 0, 40, 32))))
    assert filled[16, 25, 0] > filled[16, 25, 2] and filled[16, 38, 2] > filled[16, 38, 0]


def test_latent_mask_shape_range_and_rounding():
    mask = rect_mask((64, 48), (0, 0, 32, 48))
    latent = latent_mask(mask, (8, 6))  # (width, height) like PIL sizes
    assert isinstance(latent, torch.Tensor) and latent.shape == (1, 1, 6, 8) and latent.dtype == torch.float32
    assert latent[0, 0, :, :4].min() == 1 and latent[0, 0, :, 4:].max() == 0
    soft = latent_mask(prepare_mask(mask, (64, 48), blur=8), (8, 6), round_values=False)
    assert 0 <= soft.min() and soft.max() <= 1 and ((soft > 0) & (soft < 1)).any()
    assert set(latent_mask(prepare_mask(mask, (64, 48), blur=8), (8, 6)).unique().tolist()) <= {0.0, 1.0}


def test_paste_back_inverts_crop_for_generation_geometry():
    # a smooth image, a box that cannot reach the 1:1 aspect (clamped): crop -> fitted 64x64 with bands ->
    # identity "generation" -> pasted back lands where it came from (only resampling error)
    ys, xs = np.mgrid[0:40, 0:100]
    pixels = np.stack([xs * 2.5, ys * 6, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    original = Image.fromarray(pixels)
    mask = rect_mask((100, 40), (10, 5, 90, 35))
    box = expand_to_aspect(crop_region(mask, 4), 64, 64, 100, 40)
    generated = crop_for_generation(original, box, 64, 64)
    result = arr(paste_back(original, generated, box, mask))
    masked = arr(mask) == 255
    assert np.abs(result[masked] - pixels[masked].astype(int)).mean() < 2


def test_paste_back_undoes_a_stretched_crop():
    ys, xs = np.mgrid[0:40, 0:100]
    pixels = np.stack([xs * 2.5, ys * 6, np.full_like(xs, 90)], axis=-1).astype(np.uint8)
    original = Image.fromarray(pixels)
    mask = rect_mask((100, 40), (10, 5, 90, 35))
    box = expand_to_aspect(crop_region(mask, 4), 64, 64, 100, 40)
    generated = resize_image(original.crop(box), 64, 64, 0)
    masked = arr(mask) == 255
    result = arr(paste_back(original, generated, box, mask, crop_mode=0))
    assert np.abs(result[masked] - pixels[masked].astype(int)).mean() < 2
    wrong = arr(paste_back(original, generated, box, mask))  # undone as if fitted with bands: misplaced
    assert np.abs(wrong[masked] - pixels[masked].astype(int)).mean() > 5
    with pytest.raises(ValueError, match="crop_mode"):
        paste_back(original, generated, box, mask, crop_mode=7)
