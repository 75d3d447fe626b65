"""Map every failure to ``{"error": {"code": ..., "message": ...}}``; never a traceback."""

from __future__ import annotations

import asyncio
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from multiserve.errors import MultiserveError
from multiserve.http.responses import ORJSONResponse, error_response, from_error, shutting_down

logger = logging.getLogger("multiserve.http")

_CODES = {404: "not_found", 405: "method_not_allowed"}


async def on_multiserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MultiserveError)
    return from_error(exc)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    else:
        message = exc.detail
    headers = dict(exc.headers or {})
    if request.url.path.startswith("/v2"):  # the Open Inference Protocol's error shape
        return ORJSONResponse({"error": message}, exc.status_code, headers)
    return error_response(
        _CODES.get(exc.status_code, "http_error"), message, exc.status_code, headers
    )


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response("internal_error", "internal server error (see the server log)", 500)


HANDLERS = {
    MultiserveError: on_multiserve_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected_error,
}


async def answer_cancelled(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
    """Run ``app``; if the request is cancelled before its response started (uvicorn does so
    to requests still running at the end of a shutdown's drain), answer 503 in JSON (in the
    protocol's shape on /v2) instead of uvicorn's plain-text 500."""
    started = False

    async def tracked(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, tracked)
    except asyncio.CancelledError:
        if not started:
            response = shutting_down()
            if scope["path"].startswith("/v2"):
                response = ORJSONResponse(
                    {"error": "the server is shutting down: retry"}, 503, {"Retry-After": "1"}
                )
            await response(scope, receive, send)
        raise
