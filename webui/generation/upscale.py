"""Image upscaling: tiled model inference with feathered overlap, resampling, the Extras/Upscale job.

``tiled_apply`` runs a fully-convolutional x``scale`` model over overlapping tiles and blends them with
linear ramps across each overlap (weights sum to 1 everywhere), so seams disappear and peak memory is
bounded by the tile size; on out-of-memory it halves the tile and retries.  ``upscale_image`` implements
A1111's postprocessing semantics (scale by factor or to width/height with optional crop, model passes
then an exact Lanczos resize, alpha kept by resizing it separately).  ``run_upscale`` is the worker job.
Worker thread only (torch).
"""
from __future__ import annotations

import math
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


def _layout(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(tile starts, tile size) along one axis: the fewest tiles of at most ``tile`` pixels that overlap by
    at least ``overlap``, made equal in size and evenly spaced (no thin last tile recomputing a whole one)."""
    if length <= tile:
        return [0], length
    count = math.ceil((length - overlap) / max(1, tile - overlap))
    size = min(tile, math.ceil((length + (count - 1) * overlap) / count))
    starts = [round(i * (length - size) / (count - 1)) for i in range(count)]
    return starts, size


def tile_count(height: int, width: int, tile: int, overlap: int) -> int:
    if tile <= 0:
        return 1
    return len(_layout(height, tile, overlap)[0]) * len(_layout(width, tile, overlap)[0])


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
    (ys, tile_h), (xs, tile_w) = _layout(height, tile, overlap), _layout(width, tile, overlap)
    total, done = len(ys) * len(xs), 0
    out = None
    # Tiles form a grid, so the blend weight is separable: W(y, x) = Wy(y) * Wx(x).  Each tile's piece is
    # multiplied by its 1-D ramps only in its fade strips; the sums Wy, Wx normalise at the end (they are 1
    # everywhere unless the last tile overlaps more than one neighbour).
    ramps_y = [_edge_ramps(ys, i, tile_h, height, scale) for i in range(len(ys))]
    ramps_x = [_edge_ramps(xs, i, tile_w, width, scale) for i in range(len(xs))]
    for yi, y0 in enumerate(ys):
        for xi, x0 in enumerate(xs):
            if should_stop and should_stop():
                raise TileInterrupted()
            y1, x1 = min(y0 + tile_h, height), min(x0 + tile_w, width)
            piece = fn(x[:, :, y0:y1, x0:x1].contiguous()).float()
            if out is None:
                out = torch.zeros((1, piece.shape[1], height * scale, width * scale), dtype=torch.float32,
                                  device=piece.device)
            (top, top_w), (bottom, bottom_w) = ramps_y[yi]
            (left, left_w), (right, right_w) = ramps_x[xi]
            ph, pw = piece.shape[2], piece.shape[3]
            if top:
                piece[:, :, :top] *= top_w.to(piece.device)[:, None]
            if bottom:
                piece[:, :, ph - bottom:] *= bottom_w.to(piece.device)[:, None]
            if left:
                piece[:, :, :, :left] *= left_w.to(piece.device)[None, :]
            if right:
                piece[:, :, :, pw - right:] *= right_w.to(piece.device)[None, :]
            oy, ox = y0 * scale, x0 * scale
            out[:, :, oy:oy + ph, ox:ox + pw] += piece
            done += 1
            if on_tile:
                on_tile(done, total)
    wy = _weight_sum(ys, ramps_y, tile_h, height, scale)
    wx = _weight_sum(xs, ramps_x, tile_w, width, scale)
    if not torch.allclose(wy, torch.ones_like(wy)):
        out.div_(wy.to(out.device).view(1, 1, -1, 1))
    if not torch.allclose(wx, torch.ones_like(wx)):
        out.div_(wx.to(out.device).view(1, 1, 1, -1))
    return out


def _edge_ramps(starts: list[int], i: int, tile: int, length: int, scale: int):
    """((n_lo, ramp_lo), (n_hi, ramp_hi)) output-pixel fade strips of tile ``i`` (0 where no neighbour)."""
    start, end = starts[i], min(starts[i] + tile, length)
    lo = (starts[i - 1] + tile - start) * scale if i > 0 else 0
    hi = (end - starts[i + 1]) * scale if i + 1 < len(starts) else 0
    lo_w = torch.linspace(0, 1, lo + 2)[1:-1] if lo > 0 else None
    hi_w = torch.linspace(1, 0, hi + 2)[1:-1] if hi > 0 else None
    return (lo, lo_w), (hi, hi_w)


def _weight_sum(starts: list[int], ramps: list, tile: int, length: int, scale: int) -> torch.Tensor:
    total = torch.zeros(length * scale)
    for start, ((lo, lo_w), (hi, hi_w)) in zip(starts, ramps):
        n = (min(start + tile, length) - start) * scale
        w = torch.ones(n)
        if lo:
            w[:lo] *= lo_w
        if hi:
            w[n - hi:] *= hi_w
        total[start * scale:start * scale + n] += w
    return total


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or "out of memory" in str(exc).lower()


def model_upscale(descriptor: Any, image: Image.Image, *, tile: int, overlap: int, device: torch.device,
                  on_tile: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> Image.Image:
    """One pass of a spandrel model over an RGB image (x``descriptor.scale``), tiled, OOM-adaptive."""
    import numpy as np

    gray = getattr(descriptor, "input_channels", 3) == 1
    pixels = np.asarray(image.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    arr = torch.from_numpy(pixels[:, :, None] if gray else pixels).permute(2, 0, 1)[None]
    half = device.type == "cuda" and descriptor.supports_half
    dtype = torch.float16 if half else torch.float32
    descriptor.model.to(device=device, dtype=dtype)
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

    with torch.inference_mode():  # in-place blending/conversion on inference tensors
        return _run_tiles(fn, arr, descriptor, tile, overlap, device, h, w, on_tile, should_stop)


def _run_tiles(fn: Callable[[torch.Tensor], torch.Tensor], arr: torch.Tensor, descriptor: Any, tile: int,
               overlap: int, device: torch.device, h: int, w: int, on_tile: Any, should_stop: Any) -> Image.Image:
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
            side = max(arr.shape[2], arr.shape[3])
            current = min(tile, side) if tile > 0 else side
            if current // 2 < MIN_TILE:
                raise
            tile = current // 2
    s = descriptor.scale
    out = out[:, :, : h * s, : w * s].clamp_(0, 1).mul_(255.0).round_().to(torch.uint8)
    data = out[0].permute(1, 2, 0).cpu().numpy()
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
    if entry.kind == "plugin":
        out = entry.factory(image, max(size[0] / image.width, size[1] / image.height))
        out = out.convert("RGB") if out.mode != "RGB" else out
        return out if out.size == size else out.resize(size, Image.Resampling.LANCZOS)
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


