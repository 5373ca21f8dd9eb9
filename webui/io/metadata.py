"""Infotext: the A1111 "parameters" text that every SD tool writes into and reads from images.

Format (what A1111's ``create_infotext`` writes and ``parse_generation_parameters`` reads)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, ...

Values containing ``,`` ``:`` ``"`` or a newline are JSON-quoted.  The text lives in the PNG
``parameters`` tEXt/iTXt chunk, or in the EXIF UserComment for JPEG/WebP.

Everything here is pure (strings, bytes, PIL images); nothing imports torch or diffusers.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from typing import Any, Mapping

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from webui.generation.samplers import AUTOMATIC, canonical_schedule, split_legacy_name
from webui.image_requests import SOFT_INPAINT_ENABLED_INFOTEXT, SOFT_INPAINT_SETTINGS, SoftInpaint
from webui.types import GenerationRequest, RequestError

PNG_KEY = "parameters"
# A1111 modules/infotext_utils.py, verbatim.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
_RE_BAD_KEY_CHARS = re.compile(r"[^\w \-/]")

# A1111 fills these in when an infotext does not mention them (older versions' behaviour).
PARSE_DEFAULTS: Mapping[str, str] = {"Clip skip": "1", "Schedule type": AUTOMATIC, "RNG": "GPU"}

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286


# ---------------------------------------------------------------- writing
def format_value(value: object) -> str:
    """A1111-looking number formatting: 7.0 -> "7", 0.5 -> "0.5", 0.1 + 0.2 -> "0.3"."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return str(int(value))
        return format(value, ".10g")
    return str(value)


def quote(value: object) -> str:
    """A1111 ``quote()``: JSON-quote a value that would break the ``key: value, ...`` line."""
    text = format_value(value)
    if any(ch in text for ch in ',:"\n\r'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def clean_key(key: str) -> str:
    """Keys must match A1111's ``\\w[\\w \\-/]+``; anything else would break every reader."""
    return _RE_BAD_KEY_CHARS.sub("_", str(key)).strip()


def build_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The A1111 infotext for one image.  ``None`` values are left out; a value equal to its key
    is written as a bare flag, as A1111 does."""
    parts = []
    for raw_key, value in params.items():
        if value is None:
            continue
        key = clean_key(raw_key)
        if len(key) < 2:
            continue
        parts.append(key if key == value else f"{key}: {quote(value)}")
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def infotext_params(
    request: GenerationRequest,
    *,
    seed: int,
    subseed: int | None = None,
    sampler: str | None = None,
    schedule: str | None = None,
    model_name: str | None = None,
    model_hash: str | None = None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    lora_hashes: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
    version: str | None = None,
) -> dict[str, object]:
    """The parameter dict for ``build_infotext``, in A1111's order, from a request and what the
    worker resolved (real seed, effective schedule, model identity)."""
    params: dict[str, object] = {
        "Steps": request.steps,
        "Sampler": sampler or request.sampler,
        "Schedule type": schedule or request.schedule,
        "CFG scale": request.cfg_scale,
        "Seed": seed,
        "Size": f"{request.width}x{request.height}",
        "Model hash": model_hash[:10] if model_hash else None,
        "Model": model_name,
        "VAE hash": vae_hash[:10] if vae_hash else None,
        "VAE": vae_name,
        "Variation seed": (subseed if subseed is not None else request.subseed)
        if request.subseed_strength > 0 else None,
        "Variation seed strength": request.subseed_strength if request.subseed_strength > 0 else None,
        "Clip skip": request.clip_skip if request.clip_skip > 1 else None,
        "Lora hashes": ", ".join(f"{name}: {h[:12]}" for name, h in lora_hashes.items()) if lora_hashes else None,
    }
    params.update(extra or {})
    params["Version"] = version
    return params


# ---------------------------------------------------------------- parsing
def parse_infotext(text: str) -> dict[str, Any]:
    """A1111 ``parse_generation_parameters``: prompt, "Negative prompt" and every ``key: value``.

    Values stay strings (as in A1111); ``Size: 512x768`` also gives ``Size-1``/``Size-2``.
    """
    res: dict[str, Any] = {}
    prompt, negative, done_with_prompt = "", "", False
    *lines, lastline = (text or "").strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative += ("" if negative == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = RE_IMAGESIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res["Prompt"] = prompt
    res["Negative prompt"] = negative
    for key, default in PARSE_DEFAULTS.items():
        res.setdefault(key, default)
    return res


# infotext key -> (GenerationRequest field, converter)
REQUEST_FIELDS: Mapping[str, tuple[str, type]] = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Clip skip": ("clip_skip", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Batch size": ("batch_size", int),
    "Denoising strength": ("denoising_strength", float),
    "Hires upscale": ("hr_scale", float),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires resize-1": ("hr_resize_x", int),
    "Hires resize-2": ("hr_resize_y", int),
    "Hires sampler": ("hr_sampler_name", str),
    "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
}
HIRES_KEYS = ("Hires upscale", "Hires resize-1", "Hires upscaler")


def _convert(conv: type, value: object) -> object:
    if conv is int:
        number = float(str(value).strip())
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if conv is float:
        return float(str(value).strip())
    return str(value)


def infotext_to_request_fields(parsed: Mapping[str, Any], *, with_models: bool = False) -> dict[str, Any]:
    """Keyword arguments for ``GenerationRequest`` from ``parse_infotext`` output ("send to txt2img").

    Unparsable values are skipped (the UI keeps its current value, as A1111 does).  Old sampler
    names that carry their schedule ("DPM++ 2M Karras") are split.  Checkpoint and VAE are only
    included with ``with_models``: they are hints the catalog must resolve (see ``checkpoint_hint``).
    """
    fields: dict[str, Any] = {}
    for key, (name, conv) in REQUEST_FIELDS.items():
        if key not in parsed:
            continue
        try:
            fields[name] = _convert(conv, parsed[key])
        except (TypeError, ValueError):
            continue
    if parsed.get("Sampler"):
        raw = str(parsed["Sampler"])
        sampler, implied = split_legacy_name(raw)
        fields["sampler"] = sampler or raw
        schedule_raw = str(parsed.get("Schedule type") or AUTOMATIC)
        schedule = canonical_schedule(schedule_raw) or schedule_raw
        fields["schedule"] = implied if implied and schedule == AUTOMATIC else schedule
    elif parsed.get("Schedule type"):
        raw = str(parsed["Schedule type"])
        fields["schedule"] = canonical_schedule(raw) or raw
    if any(key in parsed for key in HIRES_KEYS):
        fields["enable_hr"] = True
    soft = soft_inpaint_from_infotext(parsed)
    if soft is not None:
        fields["soft_inpainting"] = soft
    if with_models:
        name, model_hash = checkpoint_hint(parsed)
        if name or model_hash:
            fields["checkpoint"] = name or model_hash
        if parsed.get("VAE"):
            fields["vae"] = str(parsed["VAE"])
    return fields


def soft_inpaint_from_infotext(parsed: Mapping[str, Any]) -> SoftInpaint | None:
    """A1111's ``Soft inpainting enabled: True, Soft inpainting schedule bias: 1, ...`` -> settings (None when
    not enabled).  A missing or unreadable value takes its default; out-of-range values give None."""
    if str(parsed.get(SOFT_INPAINT_ENABLED_INFOTEXT, "")).strip().lower() != "true":
        return None
    values: dict[str, float] = {}
    for spec in SOFT_INPAINT_SETTINGS:
        try:
            values[spec.name] = float(str(parsed[spec.infotext]).strip())
        except (KeyError, ValueError):
            continue
    try:
        return SoftInpaint(**values)
    except RequestError:
        return None


# sd-webui-controlnet's "ControlNet N" value: "Module: canny, Model: name [hash8], Weight: 1.0, ..."
CONTROL_UNIT_KEYS = ("Module", "Model", "Weight", "Resize Mode", "Processor Res", "Threshold A", "Threshold B",
                     "Guidance Start", "Guidance End", "Pixel Perfect", "Control Mode")
_RE_CONTROL_UNIT = re.compile(r"^ControlNet (\d+)$")
_RE_CONTROL_FIELD = re.compile(r"(?:^|, )(" + "|".join(map(re.escape, CONTROL_UNIT_KEYS)) + r"): ")
_RE_TITLE_HASH = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")


def strip_title_hash(title: str) -> str:
    """``"model.safetensors [6ce0161689]"`` (an A1111 model title) -> ``"model.safetensors"``."""
    return _RE_TITLE_HASH.sub("", title or "").strip()


def control_units_from_infotext(parsed: Mapping[str, Any]) -> dict[int, dict[str, str]]:
    """``{unit number: {"Module": "canny", "Model": "name", ...}}`` from the ``ControlNet N`` entries of a parsed
    infotext (the model's ``[hash]`` removed; a model name may itself contain ", ")."""
    units: dict[int, dict[str, str]] = {}
    for key, value in parsed.items():
        match = _RE_CONTROL_UNIT.match(str(key))
        if match is None or not isinstance(value, str):
            continue
        pieces = _RE_CONTROL_FIELD.split(value)
        fields = {name: text.strip() for name, text in zip(pieces[1::2], pieces[2::2])}
        if "Model" in fields:
            fields["Model"] = strip_title_hash(fields["Model"])
        units[int(match.group(1))] = fields
    return units


def checkpoint_hint(parsed: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(model name, short hash) named by an infotext, for the catalog to match."""
    name = str(parsed["Model"]).strip() if parsed.get("Model") else None
    model_hash = str(parsed["Model hash"]).strip().lower() if parsed.get("Model hash") else None
    return name or None, model_hash or None


# ---------------------------------------------------------------- image containers
def png_with_infotext(image: Image.Image | None, infotext: str) -> PngImagePlugin.PngInfo:
    """PngInfo carrying ``infotext`` as ``parameters`` (tEXt, or iTXt when not Latin-1), plus the
    image's other text entries."""
    info = PngImagePlugin.PngInfo()
    for key, value in (getattr(image, "info", None) or {}).items():
        if key != PNG_KEY and isinstance(key, str) and isinstance(value, str):
            info.add_text(key, value)
    info.add_text(PNG_KEY, infotext)
    return info


def exif_with_infotext(infotext: str) -> bytes:
    """EXIF bytes with ``infotext`` in UserComment (UNICODE, UTF-16BE; what A1111/piexif write)."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\x00" + infotext.encode("utf-16-be")
    return exif.tobytes()


def decode_user_comment(raw: bytes | str) -> str | None:
    if isinstance(raw, str):
        return raw.rstrip("\x00") or None
    prefix, body = raw[:8], raw[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16", errors="replace")
        else:  # no BOM: the zero bytes of ASCII characters tell the byte order
            big = body[0::2].count(0) >= body[1::2].count(0)
            text = body.decode("utf-16-be" if big else "utf-16-le", errors="replace")
    elif prefix in (b"ASCII\x00\x00\x00", b"\x00" * 8):
        text = body.decode("utf-8", errors="replace")
    else:
        text = raw.decode("utf-8", errors="replace")
    return text.rstrip("\x00") or None


def _from_info(image: Image.Image) -> str | None:
    info = image.info or {}
    value = info.get(PNG_KEY)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str) and value:
        return value
    comment = image.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    if comment:
        return decode_user_comment(comment)
    value = info.get("comment")  # GIF, JPEG COM
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return value or None


def read_infotext(source: Image.Image | str | os.PathLike | bytes) -> str | None:
    """The infotext stored in an image (PIL image, path or file bytes), or None."""
    if isinstance(source, Image.Image):
        return _from_info(source)
    try:
        handle = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except UnidentifiedImageError:
        return None
    with handle as image:
        text = _from_info(image)
        if text is None and image.format == "PNG":  # text chunks after IDAT are seen only on load
            image.load()
            text = _from_info(image)
        return text
