"""Pure conversion of the ControlNet / reference-image widgets' values (``webui/ui/control_section.py``)
to ``ControlUnit`` / ``ReferenceImages`` (no Gradio import; unit-tested).

Names: per ControlNet unit ``i`` (0-based, as sd-webui-controlnet and the infotext's "ControlNet 0" count)
``cn{i}_<part>`` for the parts in ``UNIT_PARTS``; per reference-image slot ``j`` ``ip{j}_<part>`` for
``IP_PARTS``.  The request types validate; this adds which unit or slot a mistake is in.  Threshold and
resolution sliders use sd-webui-controlnet's ``-1`` for "the preprocessor's default"; radios take their label
(any case) or number.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from webui.image_requests import CONTROL_MODES, MAX_CONTROL_UNITS, ControlUnit, ReferenceImages
from webui.types import RequestError
from webui.ui.img2img_requests import choice_index
from webui.ui.requests import parse_number

__all__ = ["IP_PARTS", "RESIZE_MODES", "UNIT_PARTS", "UNSET", "as_image", "as_images", "control_mode_value",
           "input_names", "optional_images", "requests_from", "resize_mode_value", "resolution_value", "slot_indices",
           "threshold_value", "truthy", "unit_indices", "unit_setting_names", "unit_values_from_infotext"]

RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # ControlUnit.resize_mode 0, 1, 2
DEFAULT_RESOLUTION = 512
UNSET = -1  # threshold / resolution slider value meaning "the preprocessor's default" (sd-webui-controlnet)
UNIT_PARTS = ("enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end", "control_mode",
              "resize_mode", "pixel_perfect", "processor_res", "threshold_a", "threshold_b")
IP_PARTS = ("model", "images", "weight")


def unit_indices(values: Mapping[str, Any]) -> list[int]:
    """Unit numbers present in ``values`` (components or their values), 0..N-1."""
    n = 0
    while f"cn{n}_enabled" in values:
        n += 1
    return list(range(n))


def slot_indices(values: Mapping[str, Any]) -> list[int]:
    n = 0
    while f"ip{n}_model" in values:
        n += 1
    return list(range(n))


def unit_setting_names(components: Mapping[str, Any]) -> list[str]:
    """The units' widgets an infotext can fill: every part but the image."""
    return [f"cn{i}_{part}" for i in unit_indices(components) for part in UNIT_PARTS
            if part != "image" and f"cn{i}_{part}" in components]


# infotext field -> (unit part, conversion); a value that does not convert is left out
_INFOTEXT_PARTS: Mapping[str, tuple[str, Any]] = {
    "Module": ("module", str), "Model": ("model", str), "Weight": ("weight", float),
    "Guidance Start": ("guidance_start", float), "Guidance End": ("guidance_end", float),
    "Processor Res": ("processor_res", lambda v: int(float(v))), "Threshold A": ("threshold_a", float),
    "Threshold B": ("threshold_b", float), "Pixel Perfect": ("pixel_perfect", lambda v: v.strip() == "True"),
    "Resize Mode": ("resize_mode", lambda v: RESIZE_MODES[resize_mode_value(v, "infotext")]),
    "Control Mode": ("control_mode", lambda v: control_mode_value(v, "infotext")),
}


def unit_values_from_infotext(units: Mapping[int, Mapping[str, str]], count: int) -> dict[str, Any]:
    """Widget values ``cn{i}_<part>`` for the ``ControlNet N`` entries of an infotext
    (``webui.io.metadata.control_units_from_infotext``): those units enabled with their settings, the other
    units of the tab disabled; images are never set (the infotext has none).  No entries: nothing changes."""
    if not units:
        return {}
    values: dict[str, Any] = {}
    for i in range(count):
        fields = units.get(i)
        values[f"cn{i}_enabled"] = fields is not None
        for name, text in (fields or {}).items():
            part, convert = _INFOTEXT_PARTS.get(name, (None, None))
            if part is None:
                continue
            try:
                values[f"cn{i}_{part}"] = convert(text)
            except (ValueError, IndexError, RequestError):
                continue
    return values


def input_names(components: Mapping[str, Any]) -> list[str]:
    """The value-carrying names (what a Generate handler takes) among ``components``."""
    names = [f"cn{i}_{part}" for i in unit_indices(components) for part in UNIT_PARTS]
    names += [f"ip{j}_{part}" for j in slot_indices(components) for part in IP_PARTS]
    return [n for n in names if n in components]


def optional_images(fn: Any, components: Mapping[str, Any]) -> Any:
    """Declare the section's image inputs as keyword parameters defaulting to None on the handler ``fn``
    (a ``**values`` function of ours), so gradio_client callers may leave them out: Gradio marks an input
    optional only when its component has a value or the function's parameter defaults to None.
    Sets ``fn.__signature__`` (read by ``inspect.signature``) and returns ``fn``."""
    import inspect

    signature = inspect.signature(fn)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    taken = {p.name for p in params}
    names = [f"cn{i}_image" for i in unit_indices(components)] + [f"ip{j}_images" for j in slot_indices(components)]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names if n not in taken]
    params += [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    fn.__signature__ = signature.replace(parameters=params)
    return fn


def requests_from(values: Mapping[str, Any], prefix: str) -> tuple[tuple[ControlUnit, ...],
                                                                   tuple[ReferenceImages, ...]]:
    """Component values -> (enabled ControlNet units, filled reference-image slots); raises ``RequestError``.

    Disabled units are dropped.  In txt2img (``prefix`` "txt2img") an enabled unit needs its own image;
    in img2img/inpaint an empty image means "the input image".  Radios take their label or number.
    """
    units = []
    for i in unit_indices(values):
        if not truthy(values.get(f"cn{i}_enabled")):
            continue
        label = f"ControlNet unit {i}"
        get = lambda part: values.get(f"cn{i}_{part}")  # noqa: E731 - local shorthand
        image = as_image(get("image"), f"{label} image")
        model = str(get("model") or "").strip()
        try:
            unit = ControlUnit(
                enabled=True, image=image, module=str(get("module") or "none").strip() or "none", model=model,
                weight=number_value(f"{label} weight", get("weight"), 1.0),
                guidance_start=number_value(f"{label} guidance start", get("guidance_start"), 0.0),
                guidance_end=number_value(f"{label} guidance end", get("guidance_end"), 1.0),
                control_mode=control_mode_value(get("control_mode"), label),
                resize_mode=resize_mode_value(get("resize_mode"), label),
                pixel_perfect=truthy(get("pixel_perfect")),
                processor_res=resolution_value(get("processor_res"), label),
                threshold_a=threshold_value(f"{label} threshold A", get("threshold_a")),
                threshold_b=threshold_value(f"{label} threshold B", get("threshold_b")),
            )
        except RequestError as exc:
            raise RequestError(f"{label}: {exc}") from None
        if image is None and prefix == "txt2img":
            raise RequestError(f"{label} ({model}) has no control image: upload one in the unit "
                               "(txt2img has no input image to fall back on), or untick Enable")
        units.append(unit)
    if len(units) > MAX_CONTROL_UNITS:
        raise RequestError(f"at most {MAX_CONTROL_UNITS} ControlNet units can be enabled, got {len(units)}")
    references = []
    for j in slot_indices(values):
        model = str(values.get(f"ip{j}_model") or "").strip()
        images = as_images(values.get(f"ip{j}_images"), f"Reference images {j + 1}")
        if not model and not images:
            continue
        label = f"Reference images {j + 1}"
        if not model:
            raise RequestError(f"{label}: pick an IP-Adapter model for the {len(images)} image(s), or remove them")
        try:
            references.append(ReferenceImages(model=model, images=tuple(images),
                                              weight=number_value(f"{label} weight", values.get(f"ip{j}_weight"), 1.0)))
        except RequestError as exc:
            raise RequestError(f"{label}: {exc}") from None
    return tuple(units), tuple(references)


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def number_value(label: str, value: Any, default: float) -> float:
    number = parse_number(label, value, default)
    return default if number is None else number


def threshold_value(label: str, value: Any) -> float | None:
    number = parse_number(label, value, None)
    return None if number is None or number == UNSET else number


def resolution_value(value: Any, label: str) -> int:
    number = parse_number(f"{label} processor resolution", value, None)
    if number is None or number == UNSET:
        return DEFAULT_RESOLUTION
    if not float(number).is_integer():
        raise RequestError(f"{label} processor resolution must be a whole number of pixels, got {number:g}")
    return int(number)


def control_mode_value(value: Any, label: str) -> str:
    return CONTROL_MODES[choice_index(f"{label} control mode", value, CONTROL_MODES, 0)]


def resize_mode_value(value: Any, label: str) -> int:
    return choice_index(f"{label} resize mode", value, RESIZE_MODES, 1)  # default Crop and Resize, as A1111


def as_image(value: Any, label: str) -> Any:
    """A widget's image value (PIL, numpy array, file path, Gradio file dict, (image, caption)) -> PIL RGB."""
    from PIL import Image

    if value is None or (isinstance(value, (str, dict, tuple, list)) and not value):
        return None
    if isinstance(value, Image.Image):
        return value if value.mode in ("RGB", "L") else value.convert("RGB")
    if isinstance(value, tuple):  # a gallery item (image, caption)
        return as_image(value[0], label)
    if isinstance(value, dict):  # a Gradio file dict, or an ImageEditor value (inpaint: its composite)
        inner = [value.get(k) for k in ("path", "image", "composite", "background") if value.get(k) is not None]
        return as_image(inner[0] if inner else None, label)
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as handle:
                return handle.convert("RGB")
        except (OSError, ValueError) as exc:
            raise RequestError(f"{label}: cannot read {Path(value).name} as an image ({exc})") from None
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy array
        import numpy as np

        array = np.asarray(value)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
        return image if image.mode in ("RGB", "L") else image.convert("RGB")
    raise RequestError(f"{label}: not an image ({type(value).__name__})")


def as_images(value: Any, label: str) -> list[Any]:
    """A Gallery / multiple-file value -> PIL images (empty list for nothing)."""
    if value is None:
        return []
    pair = isinstance(value, tuple) and len(value) == 2 and (value[1] is None or isinstance(value[1], str))
    items = value if isinstance(value, (list, tuple)) and not pair else [value]  # Gallery: [(image, caption)]
    out = [as_image(item, f"{label}, image {k + 1}") for k, item in enumerate(items)]
    return [image for image in out if image is not None]
