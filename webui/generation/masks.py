"""Inpaint masks: reading, preparing, "only masked" crop geometry, masked-content fill, pasting back.

Pure functions (PIL + numpy; torch only to hand the latent mask over), written after the semantics of
A1111's ``modules/masking.py`` and the mask handling in ``processing.py``:

* white (255) = change, black (0) = keep.  Masks with meaningful transparency (RGBA/LA/PA whose alpha is not
  all opaque) use the alpha channel (painted = masked), rounded at 128 like A1111's ``create_binary_mask``;
  everything else uses luminance.
* ``prepare_mask`` binarises (> 127 is masked), inverts for "Inpaint not masked", then blurs.  A1111 blurs with
  ``cv2.GaussianBlur`` (sigma = ``mask_blur``, kernel truncated at 2.5 sigma); here Pillow's
  ``GaussianBlur(mask_blur)`` (same sigma, an extended box-blur approximation): measured against A1111's
  blur the feather differs by at most 2 / 5 / 9 grey levels for mask_blur 1 / 4 / 64.
* "Only masked" (``inpaint_full_res``): ``crop_region`` is the mask's bounding box plus padding,
  ``expand_to_aspect`` grows it to the generation aspect, the crop is fitted with resize mode 2
  (``crop_for_generation``) and ``paste_back`` undoes that with mode 1, then blends with the mask.
* Pixels where the blend mask is 0 are bit-identical to the original (``Image.composite`` is exact at 0 and 255).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps

from webui.generation.image_prep import as_pil, normalize_image, resize_image
from webui.image_requests import (RESIZE_AND_FILL, RESIZE_CROP_AND_RESIZE, RESIZE_JUST_RESIZE,
                                  RESIZE_LATENT_UPSCALE, check_image)
from webui.types import RequestError

EMPTY_MASK_MESSAGE = ("mask is empty: paint over the area to change (or upload a mask), "
                      "or use img2img without a mask")
THRESHOLD = 127  # mask values above this count as masked
# A1111 masking.fill: blur radii and how often each blurred layer is composited (coarse to fine)
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))
FILL_BLUR_STEP = 8  # blur radii of 16 and more run on an image reduced by radius // 8
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")

Box = tuple[int, int, int, int]
# resize mode that fitted an "only masked" crop -> the mode that puts the generated crop back in the box
_UNDO_CROP_MODE = {RESIZE_AND_FILL: RESIZE_CROP_AND_RESIZE, RESIZE_CROP_AND_RESIZE: RESIZE_AND_FILL,
                   RESIZE_JUST_RESIZE: RESIZE_JUST_RESIZE, RESIZE_LATENT_UPSCALE: RESIZE_JUST_RESIZE}


def _binary(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.where(values > THRESHOLD, 255, 0).astype(np.uint8), mode="L")


def mask_from_any(mask: Any) -> Image.Image:
    """A mask as an 8-bit "L" image (255 = masked) from a PIL image or numpy array of any mode.

    Alpha masks (some pixel not fully opaque) -> the alpha channel, binarised at 128 (A1111
    ``create_binary_mask``); bool arrays -> 0/255; float arrays in 0..1 are scaled; otherwise the luminance,
    left as is (``prepare_mask`` binarises).
    """
    image = as_pil(mask, label="mask")  # bool arrays become 0/255
    check_image(image, "mask")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA_MODES:
        alpha = image.getchannel("A") if image.mode != "PA" else image.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return _binary(np.asarray(alpha))
        image = image.convert("RGB")
    if image.mode == "L":
        return image
    return normalize_image(image, label="mask").convert("L")


def _layer_alpha(layer: Any, size: tuple[int, int] | None) -> np.ndarray:
    """Alpha of one editor layer, resized (nearest) to ``size`` when given and different."""
    image = as_pil(_open_any(layer), label="mask layer")
    if image.mode not in _ALPHA_MODES and not (image.mode == "P" and "transparency" in image.info):
        image = image.convert("L")  # a layer without alpha: its brightness is the stroke
    else:
        image = image.convert("RGBA").getchannel("A")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.NEAREST)
    return np.asarray(image)


def _open_any(value: Any) -> Any:
    if isinstance(value, str):
        with Image.open(value) as opened:
            return opened.copy()
    return value


def _fully_transparent(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES and image.getchannel("A").getextrema()[1] == 0


def editor_to_image_and_mask(value: Mapping[str, Any] | None,
                             *, background: tuple[int, int, int] = (255, 255, 255)
                             ) -> tuple[Image.Image | None, Image.Image | None]:
    """(image, mask) from a Gradio 6 ``ImageEditor`` value ``{"background", "layers", "composite"}``.

    The image is the background flattened on ``background`` (None when nothing was uploaded: no background
    or a fully transparent one).  The mask is the
    union (maximum) of the layers' alpha, "L", at the image size; None when there are no layers at all.  A
    blank drawing gives an all-black mask, which ``prepare_mask`` refuses with a message.  Entries may be
    PIL images, numpy arrays or file paths.
    """
    if not value:
        return None, None
    source = _open_any(value.get("background"))
    if source is not None and _fully_transparent(as_pil(source, label="inpaint image")):
        source = None  # the editor's empty canvas: nothing was uploaded
    image = normalize_image(source, label="inpaint image", background=background) if source is not None else None
    layers = [layer for layer in (value.get("layers") or []) if layer is not None]
    if not layers:
        return image, None
    size = image.size if image is not None else None
    union: np.ndarray | None = None
    for layer in layers:
        alpha = _layer_alpha(layer, size)
        size = size or (alpha.shape[1], alpha.shape[0])
        union = alpha.copy() if union is None else np.maximum(union, alpha)
    return image, Image.fromarray(union, mode="L")


def prepare_mask(mask: Any, size: tuple[int, int], *, invert: bool = False, blur: int = 0) -> Image.Image:
    """The mask the pipeline uses: "L", ``size`` (width, height), binarised, inverted if asked, blurred.

    A mask of another size is resized (bilinear, then thresholded).  ``blur`` is the Gaussian sigma in
    pixels (A1111 ``mask_blur``).  Raises RequestError when nothing is masked (after inverting).
    """
    image = mask_from_any(mask)
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.BILINEAR)
    values = np.asarray(image) > THRESHOLD
    if invert:
        values = ~values
    if not values.any():
        raise RequestError(EMPTY_MASK_MESSAGE)
    result = Image.fromarray(values.astype(np.uint8) * 255, mode="L")
    if blur > 0:
        result = result.filter(ImageFilter.GaussianBlur(blur))
    return result


def overlay_mask(mask: Image.Image) -> Image.Image:
    """A1111's whole-image overlay mask: the blurred mask doubled (clipped), so the generated pixels cover
    every pixel at least half masked and the feather fades out only on the outer side of the edge."""
    doubled = np.clip(np.asarray(mask, dtype=np.uint16) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(doubled, mode="L")


def crop_region(mask: Image.Image, padding: int) -> Box:
    """(x0, y0, x1, y1), x1/y1 exclusive: the bounding box of mask > 0 grown by ``padding``, inside the image."""
    box = mask.convert("L").getbbox()
    if box is None:
        raise RequestError(EMPTY_MASK_MESSAGE)
    x0, y0, x1, y1 = box
    width, height = mask.size
    return max(x0 - padding, 0), max(y0 - padding, 0), min(x1 + padding, width), min(y1 + padding, height)


def _grow(lo: int, hi: int, wanted: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown evenly to ``wanted`` length, shifted back inside [0, limit), clamped when too long."""
    extra = max(0, wanted - (hi - lo))
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, min(limit, hi - lo)
    return lo, hi


def expand_to_aspect(box: Box, target_w: int, target_h: int, image_w: int, image_h: int) -> Box:
    """``box`` grown (never shrunk) to the ``target_w``:``target_h`` aspect ratio and moved to stay inside the
    image (A1111 ``expand_crop_region``).  When the image is too small in that direction the box is clamped
    to the image and keeps a different aspect (``crop_for_generation`` then fills the rest)."""
    x0, y0, x1, y1 = box
    width, height = x1 - x0, y1 - y0
    target = target_w / target_h
    if width / height > target:
        y0, y1 = _grow(y0, y1, round(width / target), image_h)
    else:
        x0, x1 = _grow(x0, x1, round(height * target), image_w)
    return x0, y0, x1, y1


def crop_for_generation(image: Image.Image, box: Box, width: int, height: int) -> Image.Image:
    """The ``box`` of ``image`` fitted to ``width`` x ``height`` for "only masked" (A1111: crop, mode 2)."""
    return resize_image(image.crop(box), width, height, RESIZE_AND_FILL)


def composite_masked(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` where ``mask`` is 255, ``original`` where it is 0, blended between (A1111 overlay).
    Unmasked pixels are bit-identical to ``original``; ``generated`` must have the original's size."""
    if generated.size != original.size or mask.size != original.size:
        raise ValueError(f"composite_masked: sizes differ (original {original.size}, generated "
                         f"{generated.size}, mask {mask.size})")
    return Image.composite(generated.convert("RGB"), original.convert("RGB"), mask.convert("L"))


def paste_back(original: Image.Image, generated: Image.Image, box: Box, mask: Image.Image,
               *, crop_mode: int = RESIZE_AND_FILL) -> Image.Image:
    """Put a generated "only masked" crop back: resized to the box, placed into a copy of ``original``,
    blended with the full-size ``mask``.

    ``crop_mode`` is the resize mode that fitted the crop to the generation size: 2 (``crop_for_generation``,
    A1111) is undone with mode 1 (A1111 ``uncrop``), a stretched crop (0 / 3) by stretching back.
    """
    x0, y0, x1, y1 = box
    undo = _UNDO_CROP_MODE.get(crop_mode)
    if undo is None:
        raise ValueError(f"paste_back: crop_mode must be 0..3, got {crop_mode}")
    patch = resize_image(generated.convert("RGB"), x1 - x0, y1 - y0, undo)
    pasted = original.convert("RGB")  # always a new image (Pillow copies on a same-mode convert)
    pasted.paste(patch, (x0, y0))
    return composite_masked(original, pasted, mask)


def _blur(image: Image.Image, radius: int) -> Image.Image:
    """Gaussian blur; wide radii are computed at 1/(radius // 8) resolution (box-reduced, then bilinear back:
    the result is smooth at that scale anyway), which keeps a 2048x2048 fill well under a second."""
    if radius <= 0:
        return image
    factor = radius // FILL_BLUR_STEP
    if factor < 2:
        return image.filter(ImageFilter.GaussianBlur(radius))
    small = image.reduce(factor).filter(ImageFilter.GaussianBlur(radius / factor))
    return small.resize(image.size, Image.Resampling.BILINEAR)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111 "fill" masked content: the masked area replaced with colours smeared in from its surroundings.

    The unmasked pixels (alpha = 255 - mask, premultiplied) are blurred at decreasing radii and each blur is
    alpha-composited over the previous ones, so far inside the mask the colour is a wide average of the
    surroundings and near the edge a local one; the last pass (radius 0) puts the unmasked pixels back.
    Fully masked pixels keep nothing of the original.  A fully masked image comes out black.
    """
    keep = ImageOps.invert(mask.convert("L"))
    source = image.convert("RGBA")
    source.putalpha(keep)
    premultiplied = source.convert("RGBa")
    result = Image.new("RGBA", image.size)
    for radius, repeats in FILL_PASSES:
        layer = _blur(premultiplied, radius).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


def latent_mask(mask: Image.Image, latent_size: tuple[int, int], *, round_values: bool = True) -> torch.Tensor:
    """The mask at latent resolution as a float32 tensor (1, 1, h, w) in 0..1 (1 = masked).

    ``latent_size`` is (width, height) like every size here (PIL order: ``(image_w // 8, image_h // 8)``),
    the tensor is (1, 1, height, width).  Resized bilinearly; rounded to 0/1 like A1111 (``mask_round``)
    unless ``round_values`` is False.  Used for "latent noise" / "latent nothing" and 4-channel inpainting.
    """
    width, height = (int(v) for v in latent_size)
    small = mask.convert("L").resize((width, height), Image.Resampling.BILINEAR)
    values = np.asarray(small, dtype=np.float32) / 255.0
    if round_values:
        values = np.round(values)
    return torch.from_numpy(np.ascontiguousarray(values))[None, None]
