"""``/docs`` and ``/openapi.json`` for our routes, behind the same login as the API.

FastAPI's own docs routes (``--nowebui``) and Gradio's ``/openapi.json`` are not protected, so they are
replaced by ours.  Swagger UI loads its script from a CDN; offline, the page still lists every route
(plain HTML under the Swagger container) and ``/openapi.json`` is complete.
"""
from __future__ import annotations

import html
from typing import Any, Sequence

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

DOC_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
TITLE = "WebUI API"
VERSION = "1"
DESCRIPTION = (
    "A1111-compatible `/sdapi/v1` (with `--api` or `--nowebui`) and the WebUI job API `/webui/v1` "
    "(job ids, progress events, cancellation, shared FIFO queue with the UI). See docs/api.md."
)


def _route_list(schema: dict[str, Any]) -> str:
    rows = []
    for path, operations in sorted(schema.get("paths", {}).items()):
        for method, op in operations.items():
            summary = op.get("summary") or ""
            rows.append(f"<li><code>{html.escape(method.upper())} {html.escape(path)}</code> "
                        f"{html.escape(summary)}</li>")
    return "<ul>" + "".join(rows) + "</ul>"


def install(app: FastAPI, routers: Sequence[APIRouter], route_cls) -> None:
    """Replace any unprotected docs routes with protected ones describing ``routers``."""
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in DOC_PATHS]
    mark_changed = getattr(app.router, "_mark_routes_changed", None)
    if callable(mark_changed):
        mark_changed()
    cache: dict[str, Any] = {}

    def schema() -> dict[str, Any]:
        if "schema" not in cache:
            routes = [route for router in routers for route in router.routes]
            cache["schema"] = get_openapi(title=TITLE, version=VERSION, description=DESCRIPTION, routes=routes)
        return cache["schema"]

    docs = APIRouter(route_class=route_cls, include_in_schema=False)

    @docs.get("/openapi.json")
    def openapi_json():
        return JSONResponse(schema())

    @docs.get("/docs")
    def swagger():
        page = get_swagger_ui_html(openapi_url="/openapi.json", title=f"{TITLE} - docs").body.decode("utf-8")
        fallback = (f"<noscript><h1>{TITLE}</h1>{_route_list(schema())}</noscript>"
                    f"<details style='margin:1em;font-family:sans-serif'><summary>All routes (plain list)</summary>"
                    f"{_route_list(schema())}<p>Full schema: <a href='/openapi.json'>/openapi.json</a></p></details>")
        return HTMLResponse(page.replace("</body>", fallback + "</body>"))

    app.include_router(docs)
