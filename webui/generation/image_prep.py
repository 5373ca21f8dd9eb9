"""Input images for img2img / inpaint / ControlNet: normalise any PIL mode to RGB, resize with A1111 modes.

Pure functions (PIL + numpy, no model, no torch).

``normalize_image`` turns whatever a user uploaded into an 8-bit RGB image, the way A1111's
``images.flatten`` does for img2img (transparent pixels flattened on white), plus the modes A1111 does not
handle well: CMYK, 16-bit grey ("I;16", "I;16B", "I;16L", "I"), 32-bit float ("F"), bilevel ("1"), palette
with transparency.  ``resize_image`` is A1111's ``images.resize_image`` without upscaler models:
0 "Just resize" (stretch), 1 "Crop and resize" (scale to cover, centre crop), 2 "Resize and fill" (scale to
fit, the empty bands filled by stretching the edge rows/columns), 3 "Just resize (latent upscale)" resized
like 0.  Every mode returns exactly ``width`` x ``height``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from webui.image_requests import (RESIZE_AND_FILL, RESIZE_CROP_AND_RESIZE, RESIZE_JUST_RESIZE,
                                  RESIZE_LATENT_UPSCALE, RESIZE_MODE_NAMES, check_image)
from webui.types import RequestError

WHITE = (255, 255, 255)
RESAMPLE = Image.Resampling.LANCZOS
LATENT_MULTIPLE = 8  # VAE downscale factor: generation sizes are multiples of this

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DIRECT_MODES = ("RGB", "L", "1", "CMYK", "YCbCr", "RGBX", "HSV")


def _array_to_image(array: np.ndarray, label: str) -> Image.Image:
    """A numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); bool, integer or float (0..1) values."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise RequestError(f"{label}: an array of shape {array.shape} is not an image "
                           "(expected height x width, with 1, 3 or 4 channels)")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        finite = np.nan_to_num(array.astype(np.float32))
        scale = 255.0 if finite.size and float(finite.max()) <= 1.0 else 1.0
        array = np.clip(np.rint(finite * scale), 0, 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = _scale_16bit(array)
    elif array.dtype != np.uint8:
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


def as_pil(image: Any, *, label: str) -> Image.Image:
    """A PIL image from a PIL image or a numpy array (Gradio hands either); anything else is refused."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return _array_to_image(image, label)
    raise RequestError(f"{label}: not an image (got {type(image).__name__}); upload a PNG, JPEG or WebP file")


def _scale_16bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255 by rounding v / 257 (65535 -> 255, 257 * k -> k): the full range is kept."""
    wide = np.clip(values.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey images to 8-bit "L", scaled (never clipped at 255).

    "I;16*" are 16-bit by definition.  "I" (32-bit; older Pillow opens 16-bit PNGs as "I") is treated as
    16-bit unless every value fits in 0..255.  "F" is treated as 0..1 when its maximum is at most 1,
    otherwise as 0..255.
    """
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        return Image.fromarray(_scale_16bit(values))
    if image.mode == "F":
        values = np.nan_to_num(values.astype(np.float32))
        scale = 255.0 if values.size and float(values.max()) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8))
    if values.size and int(values.max()) > 255:
        return Image.fromarray(_scale_16bit(values))
    return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8))


def flatten_alpha(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An image with transparency composited over ``background`` (A1111 ``images.flatten``)."""
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, tuple(background) + (255,))
    base.alpha_composite(rgba)
    return base.convert("RGB")


def normalize_image(image: Any, *, label: str, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any PIL image (or numpy array) -> 8-bit RGB, after the size check of ``check_image``.

    Transparency (RGBA, LA, palette with a transparent index) is flattened on ``background`` (A1111 flattens
    img2img inputs on white); CMYK goes through Pillow's CMYK -> RGB; 16-bit / float grey is scaled to
    8 bits.  An RGB input is returned as is (not copied).
    """
    image = as_pil(image, label=label)
    check_image(image, label)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        if "transparency" in image.info:
            return flatten_alpha(image, background)
        return image.convert("RGB")
    if mode in _ALPHA_MODES:
        return flatten_alpha(image, background)
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return _grey_to_l(image).convert("RGB")
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise RequestError(f"{label}: images in mode {mode!r} cannot be used ({exc}); "
                           "save it as an 8-bit RGB PNG or JPEG") from exc


def fit_for_generation(width: int, height: int, *, multiple: int = LATENT_MULTIPLE) -> tuple[int, int]:
    """Width and height rounded down to ``multiple`` (at least one multiple): sizes the VAE can encode.

    A1111 rounds "resize by" sizes down the same way (``int(w * scale // 8 * 8)``).
    """
    return (max(multiple, int(width) // multiple * multiple), max(multiple, int(height) // multiple * multiple))


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image.copy()
    return image.resize((width, height), RESAMPLE)


def _crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover width x height, keep the centre (A1111 mode 1, same integer arithmetic)."""
    src_w, src_h = image.size
    if width / height > src_w / src_h:
        new_w, new_h = width, max(height, src_h * width // src_w)
    else:
        new_w, new_h = max(width, src_w * height // src_h), height
    scaled = _resized(image, new_w, new_h)
    left, top = new_w // 2 - width // 2, new_h // 2 - height // 2
    if (left, top, new_w, new_h) == (0, 0, width, height):
        return scaled
    return scaled.crop((left, top, left + width, top + height))


def _resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to fit inside width x height, centre it, and fill the empty bands by stretching the image's
    outermost rows (above/below) or columns (left/right) across them (A1111 mode 2)."""
    src_w, src_h = image.size
    if width / height < src_w / src_h:
        new_w, new_h = width, min(height, max(1, src_h * width // src_w))
    else:
        new_w, new_h = min(width, max(1, src_w * height // src_h)), height
    scaled = _resized(image, new_w, new_h)
    if (new_w, new_h) == (width, height):
        return scaled
    pixels = np.asarray(scaled)
    top, left = height // 2 - new_h // 2, width // 2 - new_w // 2
    if new_h < height:  # bands above and below
        pixels = np.concatenate([np.repeat(pixels[:1], top, axis=0), pixels,
                                 np.repeat(pixels[-1:], height - top - new_h, axis=0)], axis=0)
    else:  # bands left and right
        pixels = np.concatenate([np.repeat(pixels[:, :1], left, axis=1), pixels,
                                 np.repeat(pixels[:, -1:], width - left - new_w, axis=1)], axis=1)
    return Image.fromarray(np.ascontiguousarray(pixels), mode=scaled.mode)


_RESIZERS = {
    RESIZE_JUST_RESIZE: _resized,
    RESIZE_CROP_AND_RESIZE: _crop_and_resize,
    RESIZE_AND_FILL: _resize_and_fill,
    RESIZE_LATENT_UPSCALE: _resized,
}


def resize_image(image: Image.Image, width: int, height: int, mode: int) -> Image.Image:
    """``image`` (RGB, RGBA or L) fitted to exactly ``width`` x ``height`` with A1111 resize mode ``mode``.

    0 / 3: stretch; 1: crop and resize; 2: resize and fill.  Lanczos resampling; the input is not changed.
    """
    if width < 1 or height < 1:
        raise RequestError(f"cannot resize an image to {width}x{height}: width and height must be at least 1")
    resizer = _RESIZERS.get(mode)
    if resizer is None:
        raise RequestError(f"resize_mode must be 0..3 ({', '.join(RESIZE_MODE_NAMES)}), got {mode}")
    if image.mode in ("1", "P"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB" if image.mode == "P" else "L")
    return resizer(image, int(width), int(height))
