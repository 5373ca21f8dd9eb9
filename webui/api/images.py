"""Images in and out of the API: base64 PNG with infotext out, validated base64 in (pure, PIL only).

Inputs are never trusted: the base64 must be strict, the bytes must be a PNG/JPEG/WebP/BMP/GIF image
whose header-declared size is within ``MAX_PIXELS`` (checked before any pixel is decoded, so a
decompression bomb costs nothing), and nothing is ever unpickled.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Any

from PIL import Image, UnidentifiedImageError

from webui.types import RequestError

MAX_SIDE = 8192
MAX_PIXELS = 64 * 1024 * 1024
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "GIF"})
PNG_KEY = "parameters"
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def png_bytes(image: Any, infotext: str | None = None, *, compress_level: int = 1) -> bytes:
    """PNG bytes of a PIL image, with ``infotext`` in the ``parameters`` text chunk (A1111's place)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in (getattr(image, "info", None) or {}).items():
        if key != PNG_KEY and isinstance(key, str) and isinstance(value, str):
            info.add_text(key, value)
    text = infotext if infotext is not None else (image.info or {}).get(PNG_KEY)
    if isinstance(text, str) and text:
        info.add_text(PNG_KEY, text)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info, compress_level=compress_level)
    return out.getvalue()


def encode_png_b64(image: Any, infotext: str | None = None) -> str:
    return base64.b64encode(png_bytes(image, infotext)).decode("ascii")


def preview_b64(image: Any, *, max_side: int = 512) -> str:
    """A small PNG of a live preview (previews are approximations; no need to ship them large)."""
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side))
    return base64.b64encode(png_bytes(image, compress_level=1)).decode("ascii")


def decode_b64(data: str, *, field: str = "image", max_bytes: int = 64 * 1024 * 1024) -> bytes:
    """Strict base64 (optionally a ``data:image/...;base64,`` URL) -> bytes; RequestError if invalid."""
    if not isinstance(data, str) or not data.strip():
        raise RequestError(f"{field} is empty; send the image as a base64 string")
    text = data.strip()
    if text.startswith(("http://", "https://")):
        raise RequestError(f"{field}: image URLs are not fetched; send the image itself as base64")
    text = _DATA_URL.sub("", text, count=1)
    text = "".join(text.split())  # line-wrapped base64 is common (MIME)
    if len(text) * 3 // 4 > max_bytes:
        raise RequestError(f"{field} is larger than {max_bytes // (1024 * 1024)} MB")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{field} is not valid base64") from None


def decode_image(data: str, *, field: str = "image") -> Image.Image:
    """A validated PIL image from base64 text; RequestError (-> HTTP 422) when it is not one."""
    raw = decode_b64(data, field=field)
    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise RequestError(
            f"{field} declares too many pixels; images up to {MAX_SIDE}x{MAX_SIDE} are accepted") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(f"{field} is not a PNG, JPEG, WebP, BMP or GIF image") from None
    if image.format not in ALLOWED_FORMATS:
        raise RequestError(f"{field}: {image.format} images are not accepted; send PNG, JPEG or WebP")
    width, height = image.size
    if width < 1 or height < 1 or width > MAX_SIDE or height > MAX_SIDE or width * height > MAX_PIXELS:
        raise RequestError(f"{field} is {width}x{height}; images up to {MAX_SIDE}x{MAX_SIDE} are accepted")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise RequestError(f"{field} is truncated or corrupt") from None
    return image


def text_items(image: Image.Image) -> dict[str, Any]:
    """The image's other JSON-safe metadata (A1111 ``png-info`` ``items``), without ``parameters``."""
    items: dict[str, Any] = {}
    for key, value in (image.info or {}).items():
        if not isinstance(key, str) or key == PNG_KEY:
            continue
        if isinstance(value, bytes):
            continue  # exif/icc blobs: binary, not for JSON
        if isinstance(value, (str, int, float, bool)):
            items[key] = value
        elif isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
            items[key] = list(value)
    return items
