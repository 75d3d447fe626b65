"""Map every failure to ``{"error": {"code": ..., "message": ...}}``; never a traceback."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from multiserve.errors import MultiserveError
from multiserve.http.responses import ORJSONResponse, error_response, from_error

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
