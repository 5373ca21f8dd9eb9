"""``alwayson_scripts`` of A1111 requests -> ControlNet units and IP-Adapter reference images (pure, PIL only).

Existing clients drive ControlNet through sd-webui-controlnet's API::

    "alwayson_scripts": {"controlnet": {"args": [{"image": b64, "module": "canny",
                                                  "model": "control_v11p_sd15_canny [d14c016b]", ...}]}}

Each enabled unit becomes a ``webui.image_requests.ControlUnit``; a unit whose module is an IP-Adapter
preprocessor (``ip-adapter_clip_sd15``, ``ip-adapter-auto``...) or whose model is a known IP-Adapter file
becomes ``ReferenceImages`` instead.  Disabled units are dropped, as are placeholder units with neither a
model nor a module.  ``" [hash]"`` suffixes of model names are stripped (the catalog resolves names).
sd-webui-controlnet's ``-1`` sentinels (``processor_res``, ``threshold_a/b``) mean "the module's default".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from webui.api.images import decode_image
from webui.api.schemas import ControlNetUnitRequest
from webui.image_requests import CONTROL_MODES, MAX_CONTROL_UNITS, ControlUnit, ReferenceImages
from webui.io.metadata import strip_title_hash
from webui.types import RequestError

DEFAULT_PROCESSOR_RES = 512
IP_ADAPTER_MODULE_PREFIXES = ("ip-adapter", "ip_adapter")
NO_MODEL = ("", "none")


@dataclass(frozen=True)
class AlwaysOn:
    """What the ``alwayson_scripts`` of one request add to its job."""

    controlnet: tuple[ControlUnit, ...] = ()
    ip_adapters: tuple[ReferenceImages, ...] = ()
    warnings: tuple[str, ...] = ()


def strip_model_hash(name: str | None) -> str:
    """``"control_v11p_sd15_canny [d14c016b]"`` -> ``"control_v11p_sd15_canny"``; ``"None"`` stays."""
    return strip_title_hash(name or "")


def is_ip_adapter(module: str, model: str, ip_adapter_models: frozenset[str] = frozenset()) -> bool:
    """sd-webui-controlnet's rule (an ``ip-adapter*`` module) or a model the catalog knows as an IP-Adapter."""
    if module.strip().lower().startswith(IP_ADAPTER_MODULE_PREFIXES):
        return True
    key = model.strip().lower()
    return bool(key) and (key in ip_adapter_models or key.rsplit(".", 1)[0] in ip_adapter_models)


def _default_normalize(image: Any, label: str) -> Any:
    from webui.generation.image_prep import normalize_image

    return normalize_image(image, label=label)


def decode_input_image(data: Any, field: str, normalize: Callable[[Any, str], Any] = _default_normalize) -> Any:
    """A base64 image (optionally a data: URL) -> an RGB PIL image; RequestError naming ``field``."""
    if not isinstance(data, str):
        raise RequestError(f"{field} must be a base64 PNG/JPEG/WebP string, got {type(data).__name__}")
    return normalize(decode_image(data, field=field), field)


def _unit_images(unit: ControlNetUnitRequest, label: str) -> tuple[list[Any], bool]:
    """(decoded images, whether a mask was sent) of a unit; ``image`` wins over the old ``input_image``."""
    value = unit.image if unit.image not in (None, "") else unit.input_image
    has_mask = bool(unit.mask) or bool(unit.mask_image)
    if value in (None, "", []):
        return [], has_mask
    items = value if isinstance(value, list) else [value]
    images = []
    for index, item in enumerate(items):
        field = f"{label}.image" + (f"[{index}]" if isinstance(value, list) else "")
        if isinstance(item, Mapping):  # Gradio's {"image": b64, "mask": b64}
            has_mask = has_mask or bool(item.get("mask"))
            item, field = item.get("image"), field + ".image"
        images.append(decode_input_image(item, field))
    return images, has_mask


def _choice(value: Any, names: tuple[str, ...], default: int) -> Any:
    """0/1/2, "1", or a name in any case -> what ControlUnit accepts (it reports what is wrong)."""
    if value is None:
        return default
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        for name in names:
            if name.lower() == text.lower():
                return name
        return text
    return value


def _sentinel(value: float | None) -> float | None:
    return None if value is None or value < 0 else value


def _unit_error(label: str, exc: ValidationError) -> RequestError:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{label}.{loc}: {err.get('msg', 'invalid value')}" if loc else f"{label}: {err.get('msg')}")
    return RequestError("; ".join(parts) or f"{label}: invalid ControlNet unit")


def controlnet_units(args: Any, *, init_image: Any = None,
                     ip_adapter_models: frozenset[str] = frozenset()) -> AlwaysOn:
    """sd-webui-controlnet ``args`` -> ControlUnit / ReferenceImages (``init_image``: img2img's first input)."""
    if isinstance(args, Mapping) and "args" in args:
        args = args["args"]
    if args is None:
        return AlwaysOn()
    if not isinstance(args, list):
        raise RequestError('alwayson_scripts.controlnet must be {"args": [unit, ...]} with one object per unit')
    units, references, warnings = [], [], []
    for index, raw in enumerate(args):
        label = f"alwayson_scripts.controlnet.args[{index}]"
        if not isinstance(raw, Mapping):
            raise RequestError(f"{label} must be an object with ControlNet unit fields "
                               "(enabled, image, module, model...)")
        try:
            unit = ControlNetUnitRequest.model_validate(dict(raw))
        except ValidationError as exc:
            raise _unit_error(label, exc) from None
        if unit.enabled is False:
            continue
        module = (unit.module or "none").strip() or "none"
        model = strip_model_hash(unit.model)
        if model.lower() in NO_MODEL:
            if module.lower() == "none":
                warnings.append(f"{label} has no model and no module and was skipped")
                continue
            raise RequestError(f"{label}: model is empty; pick one from /controlnet/model_list")
        images, has_mask = _unit_images(unit, label)
        if has_mask:
            warnings.append(f"{label}: unit masks are not used in this version; the whole image conditions")
        try:
            if is_ip_adapter(module, model, ip_adapter_models):
                images = images or ([init_image] if init_image is not None else [])
                if not images:
                    raise RequestError(f"IP-Adapter {model} needs a reference image: set image (base64)")
                references.append(ReferenceImages(model=model, images=tuple(images), weight=_num(unit.weight, 1.0)))
                continue
            if len(images) > 1:
                raise RequestError(f"a ControlNet unit takes one image, got {len(images)}")
            if not images and init_image is None:
                raise RequestError(f"ControlNet {model} has no image; txt2img units need one (image: base64)")
            control_mode = _choice(unit.control_mode, CONTROL_MODES, 0)
            if unit.guessmode and "control_mode" not in unit.model_fields_set:
                control_mode = 2  # old "guess mode" == ControlNet is more important
            units.append(ControlUnit(
                enabled=True, image=images[0] if images else None, module=module, model=model,
                weight=_num(unit.weight, 1.0), guidance_start=_num(unit.guidance_start, 0.0),
                guidance_end=_num(unit.guidance_end, 1.0), control_mode=control_mode,
                resize_mode=_choice(unit.resize_mode, (), 1), pixel_perfect=bool(unit.pixel_perfect),
                processor_res=unit.processor_res if unit.processor_res and unit.processor_res > 0
                else DEFAULT_PROCESSOR_RES,
                threshold_a=_sentinel(unit.threshold_a), threshold_b=_sentinel(unit.threshold_b),
                save_detected_map=unit.save_detected_map is not False))
        except RequestError as exc:
            raise RequestError(f"{label}: {exc}") from None
    if len(units) > MAX_CONTROL_UNITS:
        raise RequestError(f"alwayson_scripts.controlnet: at most {MAX_CONTROL_UNITS} enabled units, got {len(units)}")
    return AlwaysOn(controlnet=tuple(units), ip_adapters=tuple(references), warnings=tuple(warnings))


def _num(value: float | None, default: float) -> float:
    return default if value is None else value


# script name (lower case, as A1111 matches titles) -> parser of its args
ALWAYSON_SCRIPTS: Mapping[str, Callable[..., AlwaysOn]] = {"controlnet": controlnet_units}


def alwayson_fields(scripts: Mapping[str, Any] | None, *, init_image: Any = None,
                    ip_adapter_models: frozenset[str] = frozenset()) -> AlwaysOn:
    """Every entry of ``alwayson_scripts``; an unknown script is a RequestError (A1111's answer too)."""
    units, references, warnings = [], [], []
    for name, value in (scripts or {}).items():
        parser = ALWAYSON_SCRIPTS.get(str(name).strip().lower())
        if parser is None:
            known = ", ".join(ALWAYSON_SCRIPTS)
            raise RequestError(f"always on script {name!r} not found: this version has {known}")
        found = parser(value, init_image=init_image, ip_adapter_models=ip_adapter_models)
        units.extend(found.controlnet)
        references.extend(found.ip_adapters)
        warnings.extend(found.warnings)
    return AlwaysOn(controlnet=tuple(units), ip_adapters=tuple(references), warnings=tuple(warnings))
