"""Input normalisation (every PIL mode -> 8-bit RGB, size limit) and A1111 resize modes."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from webui.generation.image_prep import fit_for_generation, normalize_image, resize_image
from webui.image_requests import MAX_INPUT_SIDE
from webui.types import RequestError

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def pixel(image, x, y):
    return tuple(int(v) for v in np.asarray(image)[y, x])


def stripes(width, height, colours, *, vertical=True):
    """Equal stripes of ``colours`` side by side (vertical) or stacked."""
    pixels = np.zeros((height, width, 3), np.uint8)
    count = len(colours)
    for index, colour in enumerate(colours):
        if vertical:
            pixels[:, index * width // count:(index + 1) * width // count] = colour
        else:
            pixels[index * height // count:(index + 1) * height // count] = colour
    return Image.fromarray(pixels)


# --- normalize_image -------------------------------------------------------------------------------

def test_rgb_passes_through_unchanged():
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    assert normalize_image(image, label="init") is image


def test_rgba_flattened_on_white_by_default_and_on_a_given_background():
    pixels = np.zeros((2, 3, 4), np.uint8)
    pixels[0, 0] = (255, 0, 0, 255)      # opaque red
    pixels[0, 1] = (255, 0, 0, 0)        # fully transparent red
    pixels[0, 2] = (0, 0, 255, 128)      # half blue
    out = normalize_image(Image.fromarray(pixels, "RGBA"), label="init")
    assert out.mode == "RGB" and out.size == (3, 2)
    assert pixel(out, 0, 0) == RED
    assert pixel(out, 1, 0) == (255, 255, 255)
    r, g, b = pixel(out, 2, 0)
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255
    black = normalize_image(Image.fromarray(pixels, "RGBA"), label="init", background=(0, 0, 0))
    assert pixel(black, 1, 0) == (0, 0, 0)
    assert pixel(black, 2, 0)[:2] == (0, 0) and abs(pixel(black, 2, 0)[2] - 128) <= 1


def test_la_flattened():
    pixels = np.array([[[50, 255], [50, 0]]], np.uint8)
    out = normalize_image(Image.fromarray(pixels, "LA"), label="init")
    assert pixel(out, 0, 0) == (50, 50, 50)
    assert pixel(out, 1, 0) == (255, 255, 255)


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.putpixel((1, 0), 1)
    opaque = normalize_image(palette, label="init")
    assert [pixel(opaque, x, 0) for x in range(2)] == [RED, BLUE]
    palette.info["transparency"] = 1
    flat = normalize_image(palette, label="init")
    assert [pixel(flat, x, 0) for x in range(2)] == [RED, (255, 255, 255)]


def test_cmyk_converted():
    cmyk = Image.new("CMYK", (2, 1))
    cmyk.putpixel((0, 0), (0, 255, 255, 0))  # no cyan, full magenta + yellow -> red
    cmyk.putpixel((1, 0), (0, 0, 0, 255))    # full black
    out = normalize_image(cmyk, label="init")
    assert out.mode == "RGB"
    assert pixel(out, 0, 0) == RED and pixel(out, 1, 0) == (0, 0, 0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_grey_is_scaled_not_clipped(mode):
    values = [0, 1000, 257 * 100, 65535]
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (4, 1), np.array(values, dtype).tobytes())
    out = normalize_image(image, label="depth map")
    assert [pixel(out, x, 0) for x in range(4)] == [(v, v, v) for v in (0, 4, 100, 255)]


def test_32_bit_int_with_16_bit_values_is_scaled_and_8_bit_values_kept():
    wide = normalize_image(Image.fromarray(np.array([[0, 257 * 7, 65535]], np.int32)), label="init")
    assert [pixel(wide, x, 0)[0] for x in range(3)] == [0, 7, 255]
    narrow = normalize_image(Image.fromarray(np.array([[0, 7, 255]], np.int32)), label="init")
    assert [pixel(narrow, x, 0)[0] for x in range(3)] == [0, 7, 255]


def test_float_images_unit_range_and_byte_range():
    unit = normalize_image(Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)), label="init")
    assert [pixel(unit, x, 0)[0] for x in range(3)] == [0, 128, 255]
    byte = normalize_image(Image.fromarray(np.array([[0.0, 64.0, 300.0]], np.float32)), label="init")
    assert [pixel(byte, x, 0)[0] for x in range(3)] == [0, 64, 255]


def test_bilevel_and_grey():
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    out = normalize_image(bilevel, label="init")
    assert [pixel(out, x, 0) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    assert pixel(normalize_image(Image.new("L", (1, 1), 77), label="init"), 0, 0) == (77, 77, 77)


def test_numpy_arrays_accepted():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 255
    rgba[0, 0, 3] = 255
    out = normalize_image(rgba, label="init")
    assert pixel(out, 0, 0) == GREEN and pixel(out, 1, 1) == (255, 255, 255)
    assert pixel(normalize_image(np.full((2, 2), 0.5, np.float32), label="init"), 0, 0) == (128, 128, 128)


def test_huge_image_refused_with_the_limit_and_label():
    with pytest.raises(RequestError) as info:
        normalize_image(Image.new("L", (MAX_INPUT_SIDE + 1, 4)), label="photo.png")
    message = str(info.value)
    assert "photo.png" in message and f"{MAX_INPUT_SIDE + 1}x4" in message
    assert str(MAX_INPUT_SIDE) in message and "Downscale" in message


def test_not_an_image_refused():
    with pytest.raises(RequestError, match="init: not an image"):
        normalize_image("hello", label="init")
    with pytest.raises(RequestError, match="shape"):
        normalize_image(np.zeros((2, 2, 2), np.uint8), label="init")


# --- resize_image ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("source,target", [((100, 37), (64, 64)), ((37, 100), (64, 48)), ((64, 64), (64, 64)),
                                           ((64, 64), (40, 72)), ((300, 2), (16, 16))])
def test_every_mode_gives_the_exact_size(mode, source, target):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (source[1], source[0], 3), np.uint8))
    out = resize_image(image, *target, mode)
    assert out.size == target and out.mode == "RGB"


def test_same_size_is_identity_in_every_mode():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), np.uint8))
    for mode in range(4):
        assert np.array_equal(np.asarray(resize_image(image, 48, 32, mode)), np.asarray(image))


def test_just_resize_stretches_whole_image():
    out = resize_image(stripes(128, 64, [RED, BLUE]), 64, 64, 0)
    assert pixel(out, 4, 32) == RED and pixel(out, 60, 32) == BLUE
    assert np.array_equal(np.asarray(resize_image(stripes(128, 64, [RED, BLUE]), 64, 64, 3)), np.asarray(out))


def test_crop_and_resize_keeps_the_centre_of_a_wide_image():
    # 256x128: red | green green | blue quarters -> 64x64 shows only the green middle half
    out = np.asarray(resize_image(stripes(256, 128, [RED, GREEN, GREEN, BLUE]), 64, 64, 1)).astype(int)
    assert out.shape == (64, 64, 3)
    assert np.abs(out[:, 2:62] - GREEN).max() <= 2
    assert out[..., 0].max() <= 40 and out[..., 2].max() <= 40  # neither red nor blue survived


def test_crop_and_resize_keeps_the_centre_of_a_tall_image():
    out = np.asarray(resize_image(stripes(64, 256, [RED, GREEN, GREEN, BLUE], vertical=False), 32, 32, 1))
    assert np.abs(out[2:30].astype(int) - GREEN).max() <= 2


def test_resize_and_fill_keeps_the_whole_wide_image_and_stretches_edge_rows():
    source = stripes(128, 64, [RED, GREEN, BLUE])
    source.putpixel((64, 0), (10, 20, 30))  # a marker on the top row, the fill must repeat its column
    out = np.asarray(resize_image(source, 64, 64, 2)).astype(int)
    # the image scaled to 64x32 sits in rows 16..48: all three stripes visible
    middle = out[32]
    assert np.abs(middle[3] - RED).max() <= 3 and np.abs(middle[32] - GREEN).max() <= 3
    assert np.abs(middle[60] - BLUE).max() <= 3
    # bands: every row above is the first image row, every row below the last one
    assert (out[:16] == out[16]).all() and (out[48:] == out[47]).all()
    assert not (out[16] == out[47]).all()  # the marker only in the top row


def test_resize_and_fill_tall_image_fills_columns():
    source = stripes(32, 64, [RED, BLUE], vertical=False)
    out = np.asarray(resize_image(source, 64, 64, 2)).astype(int)
    assert (out[:, :16] == out[:, 16:17]).all() and (out[:, 48:] == out[:, 47:48]).all()
    assert np.abs(out[8, 32] - RED).max() <= 3 and np.abs(out[56, 32] - BLUE).max() <= 3


def test_resize_and_fill_odd_band_sizes_cover_everything():
    source = Image.new("RGB", (30, 10), GREEN)
    out = np.asarray(resize_image(source, 31, 31, 2)).astype(int)
    assert out.shape == (31, 31, 3) and np.abs(out - GREEN).max() <= 2  # no black row left over


def test_masks_and_rgba_resize_too():
    mask = Image.new("L", (40, 20), 0)
    mask.paste(255, (0, 0, 20, 20))
    out = resize_image(mask, 16, 16, 2)
    assert out.mode == "L" and out.size == (16, 16)
    assert resize_image(Image.new("RGBA", (10, 20)), 8, 8, 1).mode == "RGBA"


def test_bad_mode_and_size_refused():
    with pytest.raises(RequestError, match="resize_mode"):
        resize_image(Image.new("RGB", (8, 8)), 8, 8, 4)
    with pytest.raises(RequestError, match="0x8"):
        resize_image(Image.new("RGB", (8, 8)), 0, 8, 0)


def test_fit_for_generation_rounds_down_to_multiples_of_8():
    assert fit_for_generation(513, 767) == (512, 760)
    assert fit_for_generation(3, 64) == (8, 64)
    assert fit_for_generation(100, 100, multiple=64) == (64, 64)
