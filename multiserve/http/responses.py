from __future__ import annotations

from typing import Any

from starlette.responses import Response

from multiserve.codecs import dumps
from multiserve.errors import MultiserveError


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_response(
    code: str, message: str, status_code: int, headers: dict[str, str] | None = None
) -> ORJSONResponse:
    return ORJSONResponse({"error": {"code": code, "message": message}}, status_code, headers)


def from_error(exc: MultiserveError) -> ORJSONResponse:
    return error_response(exc.code, exc.message, exc.status_code, exc.headers)


def shutting_down() -> ORJSONResponse:
    """The answer to a request still running when the shutdown's drain time is up."""
    return error_response(
        "shutting_down",
        "the server is shutting down and this request did not finish in time: retry",
        503,
        {"Retry-After": "1", "Connection": "close"},
    )
