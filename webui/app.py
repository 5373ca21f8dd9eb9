"""Composition root: settings -> AppContext -> UI + API -> a running server.

Nothing else lives here.  ``start(settings)`` returns a ``RunningApp`` (used by launch.py and by the
integration tests, which start real servers on free ports).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from webui.settings import Settings, apply_offline_env

log = logging.getLogger(__name__)


@dataclass
class RunningApp:
    ctx: Any  # AppContext
    url: str
    share_url: str | None
    share_error: str | None
    _close: Any

    def close(self) -> None:
        self._close()


def _serve_api_only(app, settings: Settings):
    import uvicorn

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="webui-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"API server could not start on {settings.host}:{settings.port}")
        time.sleep(0.05)

    def close() -> None:
        server.should_exit = True
        thread.join(10)

    return close


def start(settings: Settings, *, open_browser: bool = False) -> RunningApp:
    apply_offline_env()
    settings.check_safe()
    from webui.api import install_routes
    from webui.context import AppContext

    ctx = AppContext.create(settings)
    try:
        if settings.nowebui:
            from fastapi import FastAPI

            app = FastAPI(title="WebUI API", docs_url="/docs")
            install_routes(app, ctx)
            stop_server = _serve_api_only(app, settings)
            url, share_url, share_error = f"http://{settings.host}:{settings.port}/", None, None
        else:
            from webui.ui import build_ui

            blocks = build_ui(ctx)
            share_error = None
            try:
                app, url, share_url = blocks.launch(
                    server_name=settings.host,
                    server_port=settings.port,
                    share=settings.share,
                    auth=list(settings.gradio_auth) or None,
                    prevent_thread_lock=True,
                    inbrowser=open_browser,
                    allowed_paths=[str(settings.outdir)],
                    max_file_size="64mb",
                    footer_links=["api", "settings"],
                    quiet=True,
                    **getattr(blocks, "webui_launch_kwargs", {}),
                )
            except Exception as exc:  # share tunnel unreachable: keep serving locally
                if not settings.share:
                    raise
                log.warning("share link unavailable: %s", exc)
                share_error = f"share link unavailable ({exc}); serving locally only"
                app, url, share_url = blocks.launch(
                    server_name=settings.host,
                    server_port=settings.port,
                    share=False,
                    auth=list(settings.gradio_auth) or None,
                    prevent_thread_lock=True,
                    allowed_paths=[str(settings.outdir)],
                    quiet=True,
                    **getattr(blocks, "webui_launch_kwargs", {}),
                )
            if settings.share and not share_url and not share_error:
                share_error = "share link unavailable (no tunnel could be reached); serving locally only"
            install_routes(app, ctx)
            stop_server = blocks.close
    except BaseException:
        ctx.close()
        raise

    def close() -> None:
        try:
            stop_server()
        finally:
            ctx.close()

    return RunningApp(ctx=ctx, url=url, share_url=share_url, share_error=share_error, _close=close)
