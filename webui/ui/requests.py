"""Pure conversion between UI component values and requests (no Gradio import, unit-tested).

Each tab keeps its widgets in a ``{name: Component}`` dict and passes it to Gradio as ``inputs_kwargs``,
so a handler receives ``{name: value}`` (and gradio_client callers use the same names);
``txt2img_request`` turns those values into a frozen ``GenerationRequest``.  Adding a widget therefore
never shifts any other argument.

Component names in the txt2img tab are the ``GenerationRequest`` field names (``n_iter`` is the
"Batch count" slider), so infotext fields can be sent back to the tab without a translation table.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from webui.types import GenerationRequest, RequestError

# txt2img widgets, in request-field names, with the label shown next to each one.
TXT2IMG_FIELDS: Mapping[str, str] = {
    "prompt": "Prompt",
    "negative_prompt": "Negative prompt",
    "steps": "Sampling steps",
    "sampler": "Sampling method",
    "schedule": "Schedule type",
    "width": "Width",
    "height": "Height",
    "cfg_scale": "CFG scale",
    "seed": "Seed",
    "n_iter": "Batch count",
    "batch_size": "Batch size",
    "clip_skip": "Clip skip",
}

_INT_FIELDS = ("steps", "width", "height", "seed", "n_iter", "batch_size", "clip_skip")
_FLOAT_FIELDS = ("cfg_scale",)
_TEXT_FIELDS = ("prompt", "negative_prompt", "sampler", "schedule")

_DEFAULTS = GenerationRequest()


def _label(name: str) -> str:
    return TXT2IMG_FIELDS.get(name) or HIRES_FIELDS.get(name, name)


def as_int(name: str, value: Any, default: int) -> int:
    """A whole number from a slider/number/text value; ``None``/empty means ``default``."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool):
        raise RequestError(f"{_label(name)} must be a whole number, got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise RequestError(f"{_label(name)} must be a whole number, got {value:g}")
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise RequestError(f"{_label(name)} must be a whole number, got {text!r}") from None
    return as_int(name, number, default)


def as_float(name: str, value: Any, default: float) -> float:
    return parse_number(_label(name), value, default)


def parse_number(label: str, value: Any, default: float | None) -> float | None:
    """A finite float from a widget value; ``None``/empty means ``default``; ``label`` names it in errors."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise RequestError(f"{label} must be a finite number, got {value!r}")
    return number


def txt2img_request(
    values: Mapping[str, Any],
    *,
    options: Mapping[str, Any] | None = None,
    checkpoint: str | None = None,
    vae: str | None = None,
    controlnet: tuple = (),
    ip_adapters: tuple = (),
) -> GenerationRequest:
    """``{name: value}`` from the txt2img tab -> ``GenerationRequest``; raises ``RequestError``.

    Missing names take the request defaults; a blank sampler/schedule takes the option default.
    ``checkpoint``/``vae`` of ``None`` mean "the current selection", resolved by ``AppContext.submit``;
    saving and preview frequency are left to the options, which the worker's handler applies.
    ``controlnet`` / ``ip_adapters``: ``ControlUnit`` / ``ReferenceImages`` (``control_section.requests_from``).
    """
    options = options or {}
    fields: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        if name in values and values[name] is not None:
            fields[name] = str(values[name])
    for name in _INT_FIELDS:
        if name in values:
            fields[name] = as_int(name, values[name], getattr(_DEFAULTS, name))
    for name in _FLOAT_FIELDS:
        if name in values:
            fields[name] = as_float(name, values[name], getattr(_DEFAULTS, name))
    if "sampler" in fields and not fields["sampler"].strip():
        fields["sampler"] = str(options.get("default_sampler") or _DEFAULTS.sampler)
    if "schedule" in fields and not fields["schedule"].strip():
        fields["schedule"] = str(options.get("default_schedule") or _DEFAULTS.schedule)
    from webui.ui.lora_stack import slots_to_refs

    loras = slots_to_refs(values)
    if loras:
        fields["loras"] = loras
    return GenerationRequest(
        **fields,
        checkpoint=checkpoint or None,
        vae=vae or None,
        controlnet=tuple(controlnet),
        ip_adapters=tuple(ip_adapters),
    )


def txt2img_field_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields (e.g. from a parsed infotext) -> values for the txt2img widgets they name.

    Unknown names are dropped; numbers are made whole where the widget is whole.  Values that cannot be
    converted are dropped too, so a hand-edited infotext fills what it can instead of failing.
    """
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in TXT2IMG_FIELDS or value is None:
            continue
        try:
            if name in _INT_FIELDS:
                out[name] = as_int(name, value, getattr(_DEFAULTS, name))
            elif name in _FLOAT_FIELDS:
                out[name] = as_float(name, value, getattr(_DEFAULTS, name))
            else:
                out[name] = str(value)
        except RequestError:
            continue
    return out


# ---- hires fix (txt2img accordion, webui/ui/hires.py) -------------------------------------------
HIRES_FIELDS: Mapping[str, str] = {
    "enable_hr": "Hires. fix",
    "hr_upscaler": "Upscaler",
    "hr_second_pass_steps": "Hires steps",
    "denoising_strength": "Denoising strength",
    "hr_scale": "Upscale by",
    "hr_resize_x": "Resize width to",
    "hr_resize_y": "Resize height to",
    "hr_sampler_name": "Hires sampling method",
    "hr_scheduler": "Hires schedule type",
    "hr_prompt": "Hires prompt",
    "hr_negative_prompt": "Hires negative prompt",
}
HIRES_SAME = "Use same"  # dropdown value meaning "the first pass's sampler/schedule"


def hires_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """Hires widgets' ``{name: value}`` -> ``GenerationRequest`` fields (empty when the accordion is off)."""
    if not values.get("enable_hr"):
        return {}
    out: dict[str, Any] = {"enable_hr": True}
    out["hr_upscaler"] = str(values.get("hr_upscaler") or _DEFAULTS.hr_upscaler)
    for name in ("hr_second_pass_steps", "hr_resize_x", "hr_resize_y"):
        if name in values:
            out[name] = as_int(name, values[name], getattr(_DEFAULTS, name))
    for name in ("denoising_strength", "hr_scale"):
        if name in values:
            out[name] = as_float(name, values[name], getattr(_DEFAULTS, name))
    for name in ("hr_sampler_name", "hr_scheduler"):
        value = values.get(name)
        out[name] = None if not value or str(value).startswith(HIRES_SAME) else str(value)
    for name in ("hr_prompt", "hr_negative_prompt"):
        out[name] = str(values.get(name) or "")
    return out
