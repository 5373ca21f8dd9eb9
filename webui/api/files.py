"""``GET /webui/v1/files/{path}``: outputs and model preview images, and nothing else.

URL layout: ``outputs/<path under the output folder>`` and ``models/<kind>/<path>`` where kind is one
of ``checkpoint vae lora embedding esrgan controlnet`` (previews next to model files).  Only image
files are served, so a model file, a config or a key can never leave the machine this way.

``resolve_file`` is pure path logic (plus ``realpath``): ``..`` segments, absolute paths, drive
letters, backslashes and NUL bytes are refused with 403; a path whose real location (symlinks
followed) is outside its root is refused with 403; anything missing, hidden or not an image is 404.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from webui.api.routing import ApiError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif"})
OUTPUTS = "outputs"
MODELS = "models"


def file_roots(settings) -> dict[str, Path]:
    """URL prefix -> folder."""
    roots = {OUTPUTS: Path(settings.outdir)}
    for kind, folder in settings.model_dirs().items():
        roots[f"{MODELS}/{kind}"] = Path(folder)
    return roots


def _refuse(reason: str) -> ApiError:
    return ApiError(403, f"forbidden path: {reason}")


def _split_root(rel: str, roots: Mapping[str, Path]) -> tuple[Path, str]:
    for prefix in sorted(roots, key=len, reverse=True):
        if rel == prefix or rel.startswith(prefix + "/"):
            return roots[prefix], rel[len(prefix) + 1:]
    raise ApiError(404, f"no such file; paths start with one of: {', '.join(sorted(roots))}")


def resolve_file(rel: str, roots: Mapping[str, Path]) -> Path:
    """The real file for URL path ``rel`` under one of ``roots``; ApiError 403/404 otherwise."""
    if "\x00" in rel:
        raise _refuse("NUL byte")
    if "\\" in rel:
        raise _refuse("backslash")
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise _refuse("absolute path")
    parts = rel.split("/")
    if any(part in ("..", ".") for part in parts):
        raise _refuse("'..' or '.' segment")
    root, inner = _split_root(rel, roots)
    inner_parts = [p for p in inner.split("/") if p]
    if not inner_parts:
        raise ApiError(404, "no such file")
    if any(part.startswith(".") for part in inner_parts):
        raise ApiError(404, "no such file")
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, *inner_parts))
    if os.path.commonpath([real_root, target]) != real_root or target == real_root:
        raise _refuse("outside the served folder")
    if Path(target).suffix.lower() not in IMAGE_SUFFIXES:
        raise ApiError(404, "no such file (only images are served)")
    if not os.path.isfile(target):
        raise ApiError(404, "no such file")
    return Path(target)


def output_url(path: str | os.PathLike | None, outdir: str | os.PathLike, prefix: str = "/webui/v1") -> str | None:
    """The ``/files`` URL of a saved output, or None when it is not under the output folder."""
    if not path:
        return None
    real_root = os.path.realpath(outdir)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root or real == real_root:
        return None
    rel = os.path.relpath(real, real_root).replace(os.sep, "/")
    return f"{prefix}/files/{OUTPUTS}/{rel}"


def build_router(ctx, route_cls) -> APIRouter:
    router = APIRouter(prefix="/webui/v1", route_class=route_cls, strict_content_type=False, tags=["files"])
    roots = file_roots(ctx.settings)

    @router.get("/files/{path:path}", summary="An output image or a model preview image",
                responses={403: {"description": "path escapes its folder"}, 404: {"description": "no such image"}})
    def get_file(path: str, request: Request):
        target = resolve_file(path, roots)
        return FileResponse(target, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    return router
