"""Pure conversion of the img2img / edit and inpaint tabs' values into an ``Img2ImgRequest`` (no Gradio).

The tabs share the txt2img widget names (``webui.ui.requests.TXT2IMG_FIELDS``: prompt, sampler, steps...,
and the LoRA slots), converted by ``txt2img_request``; this module adds the image fields.  Radios send
their label ("Crop and resize", "Only masked"); API callers may send A1111's numbers/booleans instead.
Every mistake is a ``RequestError`` whose message names the widget and what to do.
"""
from __future__ import annotations

from dataclasses import fields as dataclass_fields
from typing import Any, Mapping, Sequence

from PIL import Image

from webui.image_requests import (MASKED_CONTENT_NAMES, RESIZE_MODE_NAMES, SOFT_INPAINT_SETTINGS, Img2ImgRequest,
                                  SoftInpaint)
from webui.types import RequestError
from webui.ui.requests import parse_number, txt2img_field_values, txt2img_request

MASK_MODES = ("Inpaint masked", "Inpaint not masked")  # -> inpainting_mask_invert False / True
INPAINT_AREAS = ("Whole picture", "Only masked")  # -> inpaint_full_res False / True

# image widgets, in request-field names, with their labels (shared by both tabs; inpaint adds INPAINT_FIELDS)
IMG2IMG_FIELDS: Mapping[str, str] = {
    "resize_mode": "Resize mode",
    "denoising_strength": "Denoising strength",
    "image_cfg_scale": "Image CFG scale",
}
INPAINT_FIELDS: Mapping[str, str] = {
    "mask_blur": "Mask blur",
    "inpainting_mask_invert": "Mask mode",
    "inpainting_fill": "Masked content",
    "inpaint_full_res": "Inpaint area",
    "inpaint_full_res_padding": "Only masked padding, pixels",
}
# soft inpainting accordion of the inpaint tab: widget name -> label ("soft_inpainting" is the on/off box)
SOFT_INPAINT_FIELDS: Mapping[str, str] = {"soft_inpainting": "Soft inpainting",
                                          **{f"soft_{spec.name}": spec.label for spec in SOFT_INPAINT_SETTINGS}}
SIZE_LIMITS = (64, 2048)  # the width/height sliders' range

_DEFAULTS = Img2ImgRequest.__dataclass_fields__  # field defaults without building a request (it needs an image)


def _default(name: str) -> Any:
    return _DEFAULTS[name].default


def choice_index(label: str, value: Any, names: Sequence[str], default: int) -> int:
    """A radio's label (case-insensitive) or its A1111 number -> the number."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        return int(value) if len(names) == 2 else _bad_choice(label, value, names)
    if isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(names):
        return int(value)
    text = str(value).strip().lower()
    for index, name in enumerate(names):
        if text == name.lower() or text == str(index):
            return index
    return _bad_choice(label, value, names)


def _bad_choice(label: str, value: Any, names: Sequence[str]) -> int:
    choices = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
    raise RequestError(f"{label} {value!r} is not one of: {choices}")


def _whole(label: str, value: Any, default: int) -> int:
    number = parse_number(label, value, default)
    if not float(number).is_integer():
        raise RequestError(f"{label} must be a whole number, got {number:g}")
    return int(number)


def image_fields(values: Mapping[str, Any], *, inpaint: bool = False) -> dict[str, Any]:
    """The image widgets' values -> ``Img2ImgRequest`` fields (names absent from ``values`` are left out)."""
    out: dict[str, Any] = {}
    if "resize_mode" in values:
        out["resize_mode"] = choice_index("Resize mode", values["resize_mode"], RESIZE_MODE_NAMES,
                                          _default("resize_mode"))
    for name in ("denoising_strength", "image_cfg_scale"):
        if name in values:
            out[name] = parse_number(IMG2IMG_FIELDS[name], values[name], _default(name))
    if not inpaint:
        return out
    for name in ("mask_blur", "inpaint_full_res_padding"):
        if name in values:
            out[name] = _whole(INPAINT_FIELDS[name], values[name], _default(name))
    if "inpainting_fill" in values:
        out["inpainting_fill"] = choice_index("Masked content", values["inpainting_fill"], MASKED_CONTENT_NAMES,
                                              _default("inpainting_fill"))
    if "inpainting_mask_invert" in values:
        out["inpainting_mask_invert"] = bool(choice_index("Mask mode", values["inpainting_mask_invert"],
                                                          MASK_MODES, 0))
    if "inpaint_full_res" in values:
        out["inpaint_full_res"] = bool(choice_index("Inpaint area", values["inpaint_full_res"], INPAINT_AREAS, 0))
    if "soft_inpainting" in values:
        out["soft_inpainting"] = soft_inpaint_settings(values)
    return out


def soft_inpaint_settings(values: Mapping[str, Any]) -> SoftInpaint | None:
    """The soft inpainting accordion's values -> settings (None while its box is unticked)."""
    if not values.get("soft_inpainting") or str(values["soft_inpainting"]).strip().lower() in ("false", "0"):
        return None
    numbers = {spec.name: parse_number(f"Soft inpainting {spec.label.lower()}", values.get(f"soft_{spec.name}"),
                                       spec.default) for spec in SOFT_INPAINT_SETTINGS}
    return SoftInpaint(**numbers)


def soft_inpaint_values(settings: SoftInpaint | None) -> dict[str, Any]:
    """Settings (e.g. from an infotext) -> the accordion's widget values; nothing when ``settings`` is None."""
    if settings is None:
        return {}
    return {"soft_inpainting": True, **{f"soft_{spec.name}": getattr(settings, spec.name)
                                        for spec in SOFT_INPAINT_SETTINGS}}


def img2img_request(
    values: Mapping[str, Any],
    *,
    images: Sequence[Any],
    mask: Any = None,
    names: Sequence[str] = (),
    options: Mapping[str, Any] | None = None,
    controlnet: Sequence[Any] = (),
    ip_adapters: Sequence[Any] = (),
) -> Img2ImgRequest:
    """``{name: value}`` of an image tab + its input image(s) (and mask) -> ``Img2ImgRequest``.

    The txt2img part (prompt, sampler, size, seed, LoRA slots...) goes through ``txt2img_request``, so
    both tabs convert and validate those fields the same way.  Raises ``RequestError``.
    """
    images = [image for image in images if image is not None]
    if not images:
        raise RequestError("No input image: upload one, paste one (Ctrl+V), or send one from txt2img or PNG info")
    base = txt2img_request(values, options=options)
    # the txt2img request's own denoising_strength is the hires-fix default: leave img2img's default
    fields = {f.name: getattr(base, f.name) for f in dataclass_fields(base) if f.name != "denoising_strength"}
    fields.update(image_fields(values, inpaint=mask is not None))  # no mask: inpaint widgets are ignored
    fields.update(controlnet=tuple(controlnet), ip_adapters=tuple(ip_adapters))
    try:
        return Img2ImgRequest(**fields, init_images=tuple(images), mask=mask, names=tuple(names))
    except TypeError as exc:
        raise RequestError(str(exc)) from None


def inpaint_inputs(editor: Any, uploaded_mask: Any = None, *, invert: bool = False) -> tuple[Any, Any]:
    """The inpaint editor's value (+ an optional uploaded mask) -> (RGB image, L mask; white = change).

    Strokes drawn on the editor and an uploaded mask are combined (both mark areas to change); the uploaded
    mask (white = change, or painted on transparency) is stretched to the image size.  A missing image, or
    a mask with nothing painted (unless ``invert``: then everything changes), is a ``RequestError``.
    """
    from PIL import ImageChops

    from webui.generation.masks import THRESHOLD, editor_to_image_and_mask, mask_from_any

    image, mask = editor_to_image_and_mask(editor) if editor else (None, None)
    if image is None:
        raise RequestError("Inpaint: no image: upload one into the editor (or send one from txt2img), "
                           "then paint over the part to change")
    if uploaded_mask is not None:
        extra = mask_from_any(uploaded_mask)
        if extra.size != image.size:
            extra = extra.resize(image.size, Image.Resampling.BILINEAR)  # as masks.prepare_mask does
        mask = extra if mask is None else ImageChops.lighter(mask, extra)
    painted = mask is not None and mask.point(lambda v: 255 if v > THRESHOLD else 0).getbbox() is not None
    if not painted and not invert:
        raise RequestError("Inpaint: the mask is empty: paint over the part of the image to change with the "
                           "brush, or upload a mask (white = change)")
    if mask is None:
        mask = Image.new("L", image.size, 0)
    return image, mask


def size_from_image(image: Any, limits: tuple[int, int] = SIZE_LIMITS) -> tuple[int, int]:
    """(width, height) for the size sliders from an image: multiples of 8 within ``limits``, aspect kept."""
    size = getattr(image, "size", None)
    if not size or min(size) < 1:
        raise RequestError("Use the input image size: there is no input image yet")
    low, high = limits
    width, height = size
    scale = min(1.0, high / max(width, height))  # too large: shrink, keeping the aspect
    if min(width, height) * scale < low:  # too small: grow
        scale = low / min(width, height)
    w, h = (min(high, max(low, int(round(side * scale / 8)) * 8)) for side in (width, height))
    return w, h


def infotext_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields from a parsed infotext -> values for an image tab's widgets ("send to img2img").

    The txt2img widgets (prompt, sampler, steps, seed...) plus the denoising strength when it is given;
    width/height are left to the caller, which takes them from the sent image.
    """
    out = txt2img_field_values(fields)
    out.pop("width", None)
    out.pop("height", None)
    out.pop("n_iter", None)
    out.pop("batch_size", None)
    try:
        strength = parse_number("Denoising strength", fields.get("denoising_strength"), None)
    except RequestError:
        strength = None
    if strength is not None and 0.0 <= strength <= 1.0:
        out["denoising_strength"] = strength
    soft = fields.get("soft_inpainting")
    out.update(soft_inpaint_values(soft if isinstance(soft, SoftInpaint) else None))
    return out


def inpaint_request(
    values: Mapping[str, Any],
    *,
    options: Mapping[str, Any] | None = None,
    controlnet: Sequence[Any] = (),
    ip_adapters: Sequence[Any] = (),
) -> Img2ImgRequest:
    """The inpaint tab's values (``editor``: the ImageEditor value, ``mask``: optional uploaded mask) ->
    an ``Img2ImgRequest`` with a mask.  Raises ``RequestError``."""
    invert = bool(choice_index("Mask mode", values.get("inpainting_mask_invert"), MASK_MODES, 0))
    image, mask = inpaint_inputs(values.get("editor"), values.get("mask"), invert=invert)
    return img2img_request(values, images=[image], mask=mask, options=options, controlnet=controlnet,
                           ip_adapters=ip_adapters)
