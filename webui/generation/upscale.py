"""Image upscaling: tiled model inference with feathered overlap, resampling, the Extras/Upscale job.

``tiled_apply`` runs a fully-convolutional x``scale`` model over overlapping tiles and blends them with
linear ramps across each overlap (weights sum to 1 everywhere), so seams disappear and peak memory is
bounded by the tile size; on out-of-memory it halves the tile and retries.  ``upscale_image`` implements
A1111's postprocessing semantics (scale by factor or to width/height with optional crop, model passes
then an exact Lanczos resize, alpha kept by resizing it separately).  ``run_upscale`` is the worker job.
Worker thread only (torch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from webui.generation.upscalers import UpscalerEntry, get_descriptor
from webui.types import GeneratedImage, GenerationResult, RequestError

RESAMPLE = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
MIN_TILE = 32
MAX_MODEL_PASSES = 3
MAX_OUTPUT_SIDE = 16384


class TileInterrupted(Exception):
    pass


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = max(1, tile - overlap)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(length: int, lo_fade: int, hi_fade: int, device: Any) -> torch.Tensor:
    w = torch.ones(length, device=device)
    if lo_fade > 0:
        w[:lo_fade] = torch.linspace(0, 1, lo_fade + 2, device=device)[1:-1]
    if hi_fade > 0:
        w[length - hi_fade:] = torch.linspace(1, 0, hi_fade + 2, device=device)[1:-1]
    return w


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    if tile <= 0:
        return 1
    return len(_starts(height, tile, overlap)) * len(_starts(width, tile, overlap))


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, scale: int, tile: int,
                overlap: int, on_tile: Callable[[int, int], None] | None = None,
                should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """``fn`` over (1, C, H, W) ``x`` in tiles; ``tile <= 0`` or a small image: one call."""
    _, _, height, width = x.shape
    if tile <= 0 or (height <= tile and width <= tile):
        if on_tile:
            on_tile(1, 1)
        return fn(x)
    overlap = max(0, min(overlap, tile // 2))
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)
    total, done = len(ys) * len(xs), 0
    out = weight = None
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            if should_stop and should_stop():
                raise TileInterrupted()
            y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
            piece = fn(x[:, :, y0:y1, x0:x1])
            if out is None:
                out = torch.zeros((1, piece.shape[1], height * scale, width * scale), dtype=torch.float32,
                                  device=piece.device)
                weight = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32, device=piece.device)
            # fade only where a neighbour overlaps this tile (actual overlap with the previous/next tile)
            top = (ys[yi - 1] + tile - y0) * scale if yi > 0 else 0
            bottom = (y1 - ys[yi + 1]) * scale if yi + 1 < len(ys) else 0
            left = (xs[xi - 1] + tile - x0) * scale if xi > 0 else 0
            right = (x1 - xs[xi + 1]) * scale if xi + 1 < len(xs) else 0
            ph, pw = piece.shape[2], piece.shape[3]
            mask = _ramp(ph, top, bottom, piece.device)[:, None] * _ramp(pw, left, right, piece.device)[None, :]
            oy, ox = y0 * scale, x0 * scale
            out[:, :, oy:oy + ph, ox:ox + pw] += piece.float() * mask
            weight[:, :, oy:oy + ph, ox:ox + pw] += mask
            done += 1
            if on_tile:
                on_tile(done, total)
    return out / weight.clamp_min(1e-8)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def model_upscale(descriptor: Any, image: Image.Image, *, tile: int, overlap: int, device: torch.device,
                  on_tile: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """One pass of a spandrel model over an RGB image (x``descriptor.scale``), tiled, OOM-adaptive."""
    import numpy as np

    rgb = image.convert("RGB")
    arr = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    half = device.type == "cuda" and descriptor.supports_half
    dtype = torch.float16 if half else torch.float32
    model = descriptor.model.to(device=device, dtype=dtype)
    req = descriptor.size_requirements
    h, w = arr.shape[2], arr.shape[3]
    # pad tiny images (e.g. 1x1) up to what the architecture needs, crop the result back
    need = max(req.minimum, 1, 8 if req.minimum > 0 else 1)
    pad_h, pad_w = max(0, need - h), max(0, need - w)
    if req.multiple_of > 1:
        pad_h += (-(h + pad_h)) % req.multiple_of
        pad_w += (-(w + pad_w)) % req.multiple_of
    if pad_h or pad_w:
        arr = torch.nn.functional.pad(arr, (0, pad_w, 0, pad_h), mode="replicate")
    if req.square and arr.shape[2] != arr.shape[3]:
        side = max(arr.shape[2], arr.shape[3])
        arr = torch.nn.functional.pad(arr, (0, side - arr.shape[3], 0, side - arr.shape[2]), mode="replicate")
    if req.multiple_of > 1 and tile > 0:
        tile = max(req.multiple_of, tile - tile % req.multiple_of)

    def fn(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return descriptor(t.to(device=device, dtype=dtype)).float()

    while True:
        try:
            out = tiled_apply(fn, arr, scale=descriptor.scale, tile=tile, overlap=overlap, on_tile=on_tile,
                              should_stop=should_stop)
            break
        except TileInterrupted:
            raise
        except Exception as exc:
            if not _is_oom(exc):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            current = tile if tile > 0 else max(arr.shape[2], arr.shape[3])
            if current // 2 < MIN_TILE:
                raise
            tile = current // 2
    s = descriptor.scale
    out = out[:, :, : h * s, : w * s].clamp(0, 1)
    data = (out[0].permute(1, 2, 0).cpu().numpy() * 255.0).round().astype(np.uint8)
    if data.shape[2] == 1:
        data = data[:, :, 0]
    return Image.fromarray(data).convert("RGB")


def target_size(width: int, height: int, *, resize_mode: int, scale: float, target_w: int, target_h: int,
                crop: bool) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(size after scaling, crop size or None), A1111 postprocessing rules."""
    if resize_mode == 1:
        if target_w <= 0 or target_h <= 0:
            raise RequestError("upscaling_resize_w and upscaling_resize_h must be positive when resizing to a size")
        scale = max(target_w / width, target_h / height)
        scaled = (max(1, round(width * scale)), max(1, round(height * scale)))
        return scaled, (target_w, target_h) if crop else None
    return (max(1, round(width * scale)), max(1, round(height * scale))), None


@dataclass(frozen=True)
class UpscaleSettings:
    tile: int = 192
    overlap: int = 8
    device: torch.device = torch.device("cpu")


def apply_upscaler(entry: UpscalerEntry, image: Image.Image, size: tuple[int, int], *, cache: Any,
                   settings: UpscaleSettings, on_tile: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """``image`` (RGB) to exactly ``size`` with one upscaler (model passes, then Lanczos to size)."""
    if entry.kind == "none":
        return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    if entry.kind == "resample":
        return image.resize(size, RESAMPLE[entry.name])
    descriptor = get_descriptor(cache, entry)
    current = image
    for _ in range(MAX_MODEL_PASSES):
        if current.width >= size[0] and current.height >= size[1]:
            break
        current = model_upscale(descriptor, current, tile=settings.tile, overlap=settings.overlap,
                                device=settings.device, on_tile=on_tile, should_stop=should_stop)
        if descriptor.scale == 1:
            break
    return current if current.size == size else current.resize(size, Image.Resampling.LANCZOS)


def _center_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    left, top = (image.width - size[0]) // 2, (image.height - size[1]) // 2
    return image.crop((left, top, left + size[0], top + size[1]))


def upscale_image(image: Image.Image, *, upscaler_1: UpscalerEntry, upscaler_2: UpscalerEntry | None,
                  visibility: float, resize_mode: int, scale: float, target_w: int, target_h: int, crop: bool,
                  cache: Any, settings: UpscaleSettings, on_tile: Callable[[str, int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """One image through upscaler 1 (+ blended upscaler 2); alpha resized separately and kept."""
    (w, h), crop_size = target_size(image.width, image.height, resize_mode=resize_mode, scale=scale,
                                    target_w=target_w, target_h=target_h, crop=crop)
    if max(w, h) > MAX_OUTPUT_SIDE:
        raise RequestError(f"the result would be {w}x{h}; the largest side allowed is {MAX_OUTPUT_SIDE}. "
                           "Use a smaller scale or a smaller image.")
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") or "transparency" in image.info else None
    if alpha is None and image.mode in ("P", "PA"):
        converted = image.convert("RGBA")
        alpha = converted.getchannel("A") if converted.getextrema()[3][0] < 255 else None
    rgb = image.convert("RGB")

    def tiles(label: str):
        return (lambda i, n: on_tile(label, i, n)) if on_tile else None

    result = apply_upscaler(upscaler_1, rgb, (w, h), cache=cache, settings=settings,
                            on_tile=tiles(upscaler_1.name), should_stop=should_stop)
    if upscaler_2 is not None and upscaler_2.kind != "none" and visibility > 0:
        second = apply_upscaler(upscaler_2, rgb, (w, h), cache=cache, settings=settings,
                                on_tile=tiles(upscaler_2.name), should_stop=should_stop)
        result = Image.blend(result, second, visibility)
    if alpha is not None:
        result = result.convert("RGBA")
        result.putalpha(alpha.resize((w, h), Image.Resampling.LANCZOS))
    if crop_size is not None:
        result = _center_crop(result, crop_size)
    params: dict[str, Any] = {}
    if resize_mode == 1:
        params["Postprocess upscale to"] = f"{target_w}x{target_h}"
        params["Postprocess crop to fit"] = crop if crop else None
    else:
        params["Postprocess upscale by"] = scale
    params["Postprocess upscaler"] = upscaler_1.name
    if upscaler_2 is not None and upscaler_2.kind != "none" and visibility > 0:
        params["Postprocess upscaler 2"] = upscaler_2.name
        params["Postprocess upscaler 2 visibility"] = visibility
    if alpha is not None:
        params["Postprocess alpha"] = "kept"
    return result, {k: v for k, v in params.items() if v is not None}


def postprocess_infotext(source_infotext: str | None, params: dict[str, Any]) -> str:
    """Append ``Postprocess ...`` fields to the source image's infotext (or make a params-only one)."""
    from webui.io.metadata import build_infotext

    line = build_infotext("", "", params).strip()
    if source_infotext:
        return f"{source_infotext.rstrip()}, {line}"
    return line


def run_upscale(request: Any, *, entries: list[UpscalerEntry], cache: Any, settings: UpscaleSettings,
                control: Any, outdir: Path | None, face_restore: Callable[[Image.Image], Image.Image] | None = None,
                ) -> GenerationResult:
    """The Upscale/Extras job: every image of ``request`` (an ``UpscaleRequest``)."""
    from webui.generation.upscalers import find_upscaler
    from webui.io.images import save_image
    from webui.io.metadata import read_infotext

    started = time.perf_counter()
    first = find_upscaler(entries, request.upscaler_1)
    second = find_upscaler(entries, request.upscaler_2) if request.upscaler_2 else None
    count = len(request.images)
    images: list[GeneratedImage] = []
    interrupted = False

    def on_tile(label: str, i: int, n: int) -> None:
        control.update(step=i, total_steps=n, text=f"image {index + 1}/{count}: {label} tile {i}/{n}")

    for index, source in enumerate(request.images):
        if control.interrupted:
            interrupted = True
            break
        control.update(step=0, total_steps=1, batch_index=index, batch_count=count,
                       text=f"image {index + 1}/{count}")
        try:
            out, params = upscale_image(
                source, upscaler_1=first, upscaler_2=second, visibility=request.extras_upscaler_2_visibility,
                resize_mode=request.resize_mode, scale=request.upscaling_resize, target_w=request.upscaling_resize_w,
                target_h=request.upscaling_resize_h, crop=request.upscaling_crop, cache=cache, settings=settings,
                on_tile=on_tile, should_stop=lambda: control.interrupted)
        except TileInterrupted:
            interrupted = True
            break
        if face_restore is not None:
            out = face_restore(out)
        try:
            source_text = read_infotext(source)
        except Exception:
            source_text = None
        infotext = postprocess_infotext(source_text, params)
        path = None
        if request.save_images and outdir is not None:
            path = str(save_image(out, outdir=outdir, mode="extras", infotext=infotext, seed=0,
                                  prompt="", pattern="[number]"))
        images.append(GeneratedImage(image=out, seed=0, infotext=infotext, path=path))
    info = {"infotexts": [img.infotext for img in images], "html_info": images[0].infotext if images else "",
            "seconds": round(time.perf_counter() - started, 3), "upscaler_1": first.name,
            "upscaler_2": second.name if second else None}
    parameters = {f.name: getattr(request, f.name) for f in fields(request) if f.name != "images"}
    return GenerationResult(images=tuple(images), parameters=parameters, info=info, interrupted=interrupted)


def estimate_tiles(width: int, height: int, tile: int, overlap: int) -> int:
    return tile_count(height, width, tile, overlap) if tile > 0 else 1

