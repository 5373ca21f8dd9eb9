"""The HTTP API: A1111-compatible ``/sdapi/v1`` and our job API ``/webui/v1``.

``install_routes(app, ctx)`` is called by ``webui.app`` on the FastAPI app that Gradio's ``launch()``
returns (or on a bare FastAPI app with ``--nowebui``).  Every route checks the API credentials itself
(``--api-auth``, else ``--gradio-auth``), since Gradio's login does not cover routes mounted beside it.

* ``/sdapi/v1/*`` (``a1111.py``, ``a1111_models.py``): only with ``--api`` or ``--nowebui``.
* ``/webui/v1/jobs``, ``/queue``, ``/options``, ``/files`` (``jobs.py``, ``options_api.py``, ``files.py``):
  always on (the server listens on 127.0.0.1 unless credentials are set or --insecure is given).
* ``/docs``, ``/openapi.json`` (``docs.py``): behind the same credentials.
"""
from __future__ import annotations

from fastapi import FastAPI

from webui.api import a1111, a1111_models, controlnet, docs, extras, files, jobs, options_api
from webui.api.auth import BasicAuth
from webui.api.routing import DEFAULT_MAX_BODY, RouteConfig, Waiter, route_class


def install_routes(app: FastAPI, ctx, *, max_body: int = DEFAULT_MAX_BODY) -> None:
    route_cls = route_class(RouteConfig(auth=BasicAuth.from_settings(ctx.settings), max_body=max_body))
    waiter = Waiter()
    routers = []
    if ctx.settings.api_enabled:
        routers.append(a1111.build_router(ctx, route_cls, waiter))
        routers.append(a1111_models.build_router(ctx, route_cls, waiter))
        routers.append(extras.build_router(ctx, route_cls, waiter))
        routers.append(controlnet.build_router(ctx, route_cls, waiter))  # /controlnet/* (sd-webui-controlnet)
    routers.append(jobs.build_router(ctx, route_cls, waiter))
    routers.append(options_api.build_router(ctx, route_cls, waiter))
    routers.append(files.build_router(ctx, route_cls))
    for router in routers:  # each is built with strict_content_type=False: A1111 clients omit Content-Type
        app.include_router(router)
    docs.install(app, routers, route_cls)
    if getattr(ctx, "plugins", None) is not None:  # /ext/<name>/... from extensions, same auth + body limit
        ctx.plugins.install_routes(app, route_cls)


__all__ = ["install_routes"]
