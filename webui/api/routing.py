"""Plumbing shared by every API router: errors as JSON, auth + body limit per route, waiting on jobs.

Our routes live on the FastAPI app that Gradio's ``launch()`` returns (or on a bare FastAPI app with
``--nowebui``).  That app has already started, so middleware can no longer be added and its exception
handlers belong to Gradio.  Instead every route of ours is built by ``route_class(...)``, an
``APIRoute`` subclass whose handler

1. checks HTTP Basic credentials (before the body is read: no 64 MB upload without a login),
2. reads the body with a size limit (413 past it),
3. turns errors into A1111-style JSON: ``{"error", "detail", "body", "errors"}``.
"""
from __future__ import annotations

import logging
import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Coroutine

import anyio
import anyio.to_thread
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from webui.api.auth import BasicAuth
from webui.api.convert import NotAvailable
from webui.options import OptionError
from webui.types import RequestError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 64 * 1024 * 1024  # same as the UI's upload limit
WAIT_SLICE_S = 5.0  # a waiting thread wakes at least this often (shutdown, abandoned requests)


class ApiError(Exception):
    """An error with an HTTP status and a message a user can act on."""

    def __init__(self, status: int, detail: Any, *, error: str | None = None, headers: dict | None = None):
        super().__init__(detail if isinstance(detail, str) else str(detail))
        self.status = status
        self.detail = detail
        self.error = error or _DEFAULT_NAMES.get(status, "Error")
        self.headers = headers or {}


_DEFAULT_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    413: "PayloadTooLarge",
    422: "RequestError",
    500: "InternalError",
    501: "NotImplemented",
}


def error_response(status: int, error: str, detail: Any, *, headers: dict | None = None, **extra: Any) -> JSONResponse:
    text = detail if isinstance(detail, str) else extra.get("message", "")
    content = {"error": error, "detail": detail, "body": "", "errors": text, **extra}
    return JSONResponse(status_code=status, content=_json_safe(content), headers=headers)


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def validation_message(exc: RequestValidationError) -> str:
    """One readable line per problem: ``body.steps: Input should be a valid integer``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
        lines.append(f"{loc}: {err.get('msg', 'invalid value')}")
    return "; ".join(lines) or "invalid request"


@dataclass(frozen=True)
class RouteConfig:
    auth: BasicAuth
    max_body: int = DEFAULT_MAX_BODY


async def _limited_request(request: Request, limit: int) -> Request:
    """A copy of ``request`` whose body has been read, refusing more than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise ApiError(400, "invalid Content-Length header") from None
        if too_big:
            raise ApiError(413, f"request body is larger than the {limit // (1024 * 1024)} MB limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than the {limit // (1024 * 1024)} MB limit")
        chunks.append(chunk)
    body = b"".join(chunks)
    replayed = False

    async def receive() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await request.receive()  # after the body: wait for the disconnect, as Starlette expects

    return Request(request.scope, receive)


def route_class(config: RouteConfig) -> type[APIRoute]:
    """An APIRoute subclass bound to ``config`` (built per app, so no module-level state)."""

    class ApiRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def guarded(request: Request) -> Response:
                try:
                    if config.auth.enabled:
                        user = config.auth.check_header(request.headers.get("authorization"))
                        if user is None:
                            raise ApiError(401, "Incorrect username or password",
                                           headers=dict(config.auth.challenge_headers()))
                        request.scope.setdefault("state", {})["api_user"] = user
                    if request.method in ("POST", "PUT", "PATCH"):
                        request = await _limited_request(request, config.max_body)
                    return await handler(request)
                except ApiError as exc:
                    return error_response(exc.status, exc.error, exc.detail, headers=exc.headers or None)
                except RequestValidationError as exc:
                    message = validation_message(exc)
                    return error_response(422, "RequestValidationError", _json_safe(exc.errors()), message=message)
                except (RequestError, OptionError) as exc:
                    return error_response(422, type(exc).__name__, str(exc))
                except NotAvailable as exc:
                    return error_response(501, "NotImplemented", str(exc))
                except StarletteHTTPException as exc:
                    return error_response(exc.status_code, _DEFAULT_NAMES.get(exc.status_code, "HTTPException"),
                                          exc.detail, headers=getattr(exc, "headers", None))
                except Exception as exc:  # an API bug must answer 500 with a message, not drop the connection
                    log.error("API error %s %s:\n%s", request.method, request.url.path, traceback.format_exc())
                    return error_response(500, type(exc).__name__, str(exc) or type(exc).__name__)

            return guarded

    return ApiRoute


def api_user(request: Request) -> str | None:
    return request.scope.get("state", {}).get("api_user")


def client_id(request: Request) -> str:
    """Who submits a job: ``X-Client-Id`` header, else the login, else the remote address."""
    header = (request.headers.get("x-client-id") or "").strip()
    if header:
        return "api:" + "".join(ch for ch in header[:64] if ch.isprintable())
    user = api_user(request)
    if user:
        return f"api:{user}"
    host = request.client.host if request.client else "local"
    return f"api:{host}"


class Waiter:
    """Runs blocking waits in threads without using the server's shared thread pool.

    Gradio caps the default anyio pool at 40 threads; 40 API clients each waiting for their image
    must not starve the UI, so waits get their own, larger limiter.
    """

    def __init__(self, threads: int = 256):
        self._limiter = anyio.CapacityLimiter(threads)

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter, abandon_on_cancel=True)

    async def until_finished(self, job: Any, timeout: float | None = None) -> bool:
        """Wait for ``job`` to finish (never blocking the event loop); False on timeout."""
        deadline = None if timeout is None else anyio.current_time() + timeout
        while not job.state.finished:
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - anyio.current_time())
            if left <= 0:
                return False
            await self.run(job.wait, left)
        return True

    async def next_change(self, job: Any, seen_version: int, timeout: float) -> int:
        return await self.run(job.wait_for_change, seen_version, timeout)
