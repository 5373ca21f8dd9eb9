"""``/webui/v1/options``: the typed options store (the same one as the Settings tab and ``/sdapi/v1/options``).

``GET`` returns every value plus the spec of each known key (type, label, section, range, default), so a
client can build a settings form; ``POST`` validates everything first, loads a new checkpoint/VAE on the
worker when those change, then saves atomically and returns what was applied.  Keys we do not know are
stored as they are (A1111 configs carry many).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body

from webui.api import convert
from webui.api.routing import Waiter
from webui.options import OPTION_SPECS

PREFIX = "/webui/v1"


def option_specs(extra: Any = ()) -> list[dict[str, Any]]:
    return [{"key": s.key, "label": s.label, "section": s.section, "type": s.kind.__name__, "default": s.default,
             "minimum": s.minimum, "maximum": s.maximum} for s in (*OPTION_SPECS, *extra)]


def build_router(ctx, route_cls, waiter: Waiter) -> APIRouter:
    router = APIRouter(prefix=PREFIX, route_class=route_cls, strict_content_type=False, tags=["options"])

    @router.get("/options", summary="Every option value and the spec of each known key")
    def get_options() -> dict[str, Any]:
        specs = option_specs(ctx.options.extra_specs())  # + settings contributed by extensions
        return {"values": convert.plain(ctx.options.as_dict()), "specs": convert.plain(specs)}

    @router.post("/options", summary="Validate, apply (loading a new model first) and save options",
                 responses={422: {"description": "invalid value or unknown model; nothing is saved"}})
    async def set_options(changes: dict[str, Any] = Body(...)) -> dict[str, Any]:
        applied = await waiter.run(ctx.set_options, dict(changes))
        return {"applied": convert.plain(applied), "values": convert.plain(ctx.options.as_dict())}

    return router
