"""A1111 ``/sdapi/v1/img2img`` JSON -> ``webui.image_requests.Img2ImgRequest`` (pure: PIL, no FastAPI, no torch).

Everything txt2img and img2img share (prompt, sampler, seeds, overrides, ControlNet units...) goes through
``convert.common_fields``; this module adds the image fields with A1111 v1.10's API defaults
(``inpainting_fill`` 0 "fill", ``inpaint_full_res`` true "only masked", padding 0, ``mask_blur_x/y`` 4,
``denoising_strength`` 0.75).  Images are decoded strictly (``images.decode_image``) and init images are
normalised to RGB here, so a bad upload is a 422 naming the field (``init_images[1]``), not a failed job.
The mask is decoded but kept in its mode: transparency in it is meaningful (``generation.masks``).
"""
from __future__ import annotations

from typing import Any

from webui import image_requests
from webui.api.controlnet_units import decode_input_image
from webui.api.convert import ApiDefaults, Txt2ImgConversion, _or, apply_infotext, common_fields
from webui.api.images import decode_image
from webui.api.schemas import Img2ImgRequest
from webui.types import RequestError

A1111_DEFAULTS = {  # StableDiffusionProcessingImg2Img defaults, for fields a client sends as null
    "resize_mode": 0, "denoising_strength": 0.75, "mask_blur": 4, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0,
}
DEFAULT_IMAGE_CFG_SCALE = 1.5  # A1111 sends None; instruct-pix2pix models use 1.5
SOFT_INPAINTING_SCRIPT = "soft inpainting"  # A1111's script title "Soft Inpainting", matched in lower case


def soft_inpainting(value: Any) -> image_requests.SoftInpaint | None:
    """``alwayson_scripts["Soft Inpainting"]`` -> settings (None: disabled).  A1111's script args, in order:
    ``[enabled, schedule_bias, preservation_strength, transition_contrast_boost, mask_influence,
    difference_threshold, difference_contrast]``; missing trailing args take A1111's defaults."""
    label = 'alwayson_scripts["soft inpainting"].args'
    args = value.get("args") if isinstance(value, dict) else value
    if args is None:
        return None
    if not isinstance(args, list):
        raise RequestError(f"{label} must be a list: [enabled, schedule bias, preservation strength, "
                           "transition contrast boost, mask influence, difference threshold, difference contrast]")
    specs = image_requests.SOFT_INPAINT_SETTINGS
    if len(args) > 1 + len(specs):
        raise RequestError(f"{label} takes at most {1 + len(specs)} values, got {len(args)}")
    if not args or not args[0] or (isinstance(args[0], str) and args[0].strip().lower() in ("false", "0")):
        return None
    values: dict[str, float] = {}
    for index, (spec, raw) in enumerate(zip(specs, args[1:]), start=1):
        number = _number(raw)
        if number is None:
            raise RequestError(f"{label}[{index}] ({spec.label}) must be a number between {spec.low:g} and "
                               f"{spec.high:g}, got {raw!r}")
        values[spec.name] = number
    try:
        return image_requests.SoftInpaint(**values)
    except RequestError as exc:
        raise RequestError(f"{label}: {exc}") from None


def _number(raw: Any) -> float | None:
    if isinstance(raw, bool) or raw is None:
        return None
    try:
        number = float(raw)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN is not a number here


def split_soft_inpainting(body: Img2ImgRequest) -> tuple[Img2ImgRequest, image_requests.SoftInpaint | None]:
    """(body without the soft inpainting script, its settings): the other scripts go to ``common_fields``.
    Without the script, an ``infotext`` that enables soft inpainting sets it (A1111 v1.10 ``infotext``)."""
    scripts = dict(body.alwayson_scripts or {})
    keys = [key for key in scripts if str(key).strip().lower() == SOFT_INPAINTING_SCRIPT]
    if not keys:
        if not body.infotext:
            return body, None
        from webui.io.metadata import parse_infotext, soft_inpaint_from_infotext

        return body, soft_inpaint_from_infotext(parse_infotext(body.infotext))
    settings = soft_inpainting(scripts[keys[0]])
    rest = {key: value for key, value in scripts.items() if key not in keys}
    return body.model_copy(update={"alwayson_scripts": rest}), settings


def decode_init_images(values: list[Any] | None) -> list[Any]:
    """``init_images`` -> RGB PIL images; each error names ``init_images[i]``."""
    if not values:
        raise RequestError("init_images is empty: send at least one base64 image (PNG, JPEG or WebP)")
    return [decode_input_image(value, f"init_images[{index}]") for index, value in enumerate(values)]


def decode_mask(value: str | None) -> Any:
    """The inpaint mask (white = change) as sent: its alpha channel may be what marks the area."""
    if value in (None, ""):
        return None
    if not isinstance(value, str):
        raise RequestError(f"mask must be a base64 PNG/JPEG/WebP string, got {type(value).__name__}")
    return decode_image(value, field="mask")


def mask_blur(body: Img2ImgRequest, warnings: list[str]) -> int:
    """A1111: ``mask_blur`` sets both axes; else ``mask_blur_x``/``_y`` (one value here: the larger)."""
    if body.mask_blur is not None:
        return body.mask_blur
    x = _or(body.mask_blur_x, A1111_DEFAULTS["mask_blur"])
    y = _or(body.mask_blur_y, A1111_DEFAULTS["mask_blur"])
    if x != y:
        warnings.append(f"mask_blur_x {x} and mask_blur_y {y} differ; this version blurs both axes by {max(x, y)}")
    return max(x, y)


def _ignored(body: Img2ImgRequest) -> list[str]:
    notes = []
    if body.initial_noise_multiplier not in (None, 1, 1.0):
        notes.append("initial_noise_multiplier is not available yet in this version and was ignored")
    if body.latent_mask:
        notes.append("latent_mask is not available yet in this version and was ignored (mask is used)")
    if body.mask_round is False:
        notes.append("mask_round false is not available in this version: masks are rounded")
    if getattr(body, "enable_hr", False):  # a /webui/v1/jobs body carries the txt2img fields too
        notes.append("enable_hr (hires fix) is a txt2img option and was ignored")
    return notes


def img2img_request(body: Img2ImgRequest, defaults: ApiDefaults = ApiDefaults()) -> Txt2ImgConversion:
    """A1111 img2img JSON -> a validated ``Img2ImgRequest``; RequestError/OptionError/NotAvailable."""
    body, soft = split_soft_inpainting(apply_infotext(body))
    images = decode_init_images(body.init_images)
    mask = decode_mask(body.mask)
    fields, warnings, keep = common_fields(body, defaults, init_image=images[0])
    notes = list(warnings) + _ignored(body)
    blur = mask_blur(body, notes)
    invert = _or(body.inpainting_mask_invert, A1111_DEFAULTS["inpainting_mask_invert"])
    if invert not in (0, 1):
        raise RequestError(f"inpainting_mask_invert must be 0 (inpaint masked) or 1 (inpaint not masked), got {invert}")
    request = image_requests.Img2ImgRequest(
        **fields,
        init_images=tuple(images),
        names=tuple(f"init_images[{index}]" for index in range(len(images))),
        mask=mask,
        resize_mode=_or(body.resize_mode, A1111_DEFAULTS["resize_mode"]),
        denoising_strength=_or(body.denoising_strength, A1111_DEFAULTS["denoising_strength"]),
        image_cfg_scale=_or(body.image_cfg_scale, DEFAULT_IMAGE_CFG_SCALE),
        mask_blur=blur,
        inpainting_fill=_or(body.inpainting_fill, A1111_DEFAULTS["inpainting_fill"]),
        inpaint_full_res=bool(_or(body.inpaint_full_res, A1111_DEFAULTS["inpaint_full_res"])),
        inpaint_full_res_padding=_or(body.inpaint_full_res_padding, A1111_DEFAULTS["inpaint_full_res_padding"]),
        inpainting_mask_invert=bool(invert),
        soft_inpainting=soft,
    )
    if soft is not None and mask is None:
        notes.append("soft inpainting needs a mask and was ignored")
    return Txt2ImgConversion(request=request, send_images=_or(body.send_images, True),
                             warnings=tuple(notes), keep_options=keep)
