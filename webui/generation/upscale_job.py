"""Glue between the AppContext and the upscaling code (worker thread only).

Face restoration is a plugin hook: if something (a plugin) sets ``ctx.face_restorer`` to a callable
``PIL.Image -> PIL.Image`` it is applied after upscaling; the WebUI itself ships no GFPGAN/CodeFormer code.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from webui.generation.upscale import UpscaleSettings, run_upscale
from webui.generation.upscalers import list_upscalers

if TYPE_CHECKING:
    from webui.context import AppContext


def upscale_settings(ctx: "AppContext") -> UpscaleSettings:
    import torch

    plan = getattr(ctx.manager, "plan", None)
    device = plan.device if plan is not None else torch.device("cpu")
    return UpscaleSettings(tile=int(ctx.options.get("ESRGAN_tile")), overlap=int(ctx.options.get("ESRGAN_tile_overlap")),
                           device=device)


def upscaler_entries(ctx: "AppContext") -> list:
    """Built-ins, model files, then upscalers from extensions (``webui_upscalers`` hook)."""
    from webui.generation.upscalers import UpscalerEntry

    entries = list_upscalers(ctx.catalog, ctx.settings.esrgan_dir)
    plugins = getattr(ctx, "plugins", None)
    if plugins is not None:
        taken = {e.name.casefold() for e in entries}
        try:
            found = plugins.registry_entries("webui_upscalers")
        except Exception:  # a broken extension must not hide the built-in upscalers
            found = []
        for _extension, item in found:
            name, factory = getattr(item, "name", None), getattr(item, "factory", None)
            if name and callable(factory) and name.casefold() not in taken:
                taken.add(name.casefold())
                entries.append(UpscalerEntry(name, "plugin", factory=factory))
    return entries


def run_upscale_job(ctx: "AppContext", request: Any, control: Any, options: Any):
    return run_upscale(request, entries=upscaler_entries(ctx), cache=ctx.cache, settings=upscale_settings(ctx),
                       control=control, outdir=options.outdir if options.save else None,
                       face_restore=getattr(ctx, "face_restorer", None))
