"""Contact sheet: an image post-processor (optional watermark text) and an API route building a grid.

* ``contact_sheet_watermark`` (setting): text drawn in the bottom-right corner of every generated image
  before it is saved (empty: off).
* ``POST /ext/contact_sheet/grid`` ``{"images": [base64 PNG...], "columns": 0, "labels": [...]}``
  -> ``{"image": base64 PNG, "width", "height", "columns", "rows"}`` (behind the app's API credentials).
"""
from __future__ import annotations

import base64
import binascii
import io
import math

from webui.plugins.api import RequestError, SettingSpec, hookimpl

WEBUI_API = ">=1.0,<2"
WATERMARK_OPTION = "contact_sheet_watermark"
MAX_IMAGES = 64
GAP = 4


def watermark(image, text: str):
    """Pure: a copy of ``image`` with ``text`` in the bottom-right corner (shadowed for contrast)."""
    from PIL import ImageDraw, ImageFont

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x, y = max(0, out.width - (right - left) - 3), max(0, out.height - (bottom - top) - 4)
    draw.text((x + 1, y + 1), text, fill=(0, 0, 0), font=font)
    draw.text((x, y), text, fill=(255, 255, 255), font=font)
    return out


def make_grid(images: list, columns: int = 0, labels: list[str] | None = None):
    """Pure: images (any sizes) in a grid of equal cells, ``columns`` 0 = about square; optional labels."""
    from PIL import Image, ImageDraw

    if not images:
        raise RequestError("grid: 'images' is empty; send at least one base64 PNG")
    columns = columns or math.ceil(math.sqrt(len(images)))
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell_w, cell_h = max(i.width for i in images), max(i.height for i in images)
    label_h = 14 if labels else 0
    sheet = Image.new("RGB", (columns * cell_w + (columns + 1) * GAP, rows * (cell_h + label_h) + (rows + 1) * GAP),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for index, image in enumerate(images):
        col, row = index % columns, index // columns
        x, y = GAP + col * (cell_w + GAP), GAP + row * (cell_h + label_h + GAP)
        sheet.paste(image.convert("RGB"), (x, y))
        if labels and index < len(labels):
            draw.text((x, y + cell_h + 1), str(labels[index])[:40], fill=(0, 0, 0))
    return sheet, columns, rows


@hookimpl
def webui_settings():
    return [SettingSpec(key=WATERMARK_OPTION, default="", kind=str,
                        label="Watermark text on generated images (empty: none)")]


@hookimpl
def webui_postprocess_image(image, api):
    text = api.option(WATERMARK_OPTION) or ""
    return watermark(image, text) if text else None


def _decode(data: str):
    from PIL import Image

    if not isinstance(data, str):
        raise RequestError("grid: every entry of 'images' must be a base64 string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.load()
    except (binascii.Error, ValueError, OSError):
        raise RequestError("grid: an entry of 'images' is not a base64-encoded image") from None
    return image


@hookimpl
def webui_api_routes(router):
    from fastapi import Body

    @router.post("/grid", summary="Build a contact sheet from base64 images")
    def grid(body: dict = Body(...)) -> dict:
        images = body.get("images") or []
        if not isinstance(images, list) or len(images) > MAX_IMAGES:
            raise RequestError(f"grid: 'images' must be a list of at most {MAX_IMAGES} base64 images")
        columns = body.get("columns") or 0
        if not isinstance(columns, int) or columns < 0:
            raise RequestError("grid: 'columns' must be a non-negative integer")
        labels = body.get("labels")
        sheet, columns, rows = make_grid([_decode(item) for item in images], columns,
                                         [str(x) for x in labels] if isinstance(labels, list) else None)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        return {"image": base64.b64encode(buffer.getvalue()).decode("ascii"), "width": sheet.width,
                "height": sheet.height, "columns": columns, "rows": rows}
