"""Every `MultiserveError` as a gRPC status: the code its HTTP status maps to, the same message
the HTTP face answers, and the retry hint as trailing metadata."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from grpc import aio

from multiserve.errors import MultiserveError

logger = logging.getLogger("multiserve.grpc")

# By HTTP status, so that an error class added later gets a code without a change here.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    406: grpc.StatusCode.INVALID_ARGUMENT,
    # Unloading a pinned model: refused until the operator unpins it, so not worth a retry.
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    # Overload: gRPC clients retry UNAVAILABLE, and the pushback below says when.
    429: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
INTERNAL_MESSAGE = "internal server error (see the server log)"


def code_of(exc: MultiserveError) -> grpc.StatusCode:
    code = _CODES.get(exc.status_code)
    if code is not None:
        return code
    return grpc.StatusCode.INVALID_ARGUMENT if exc.status_code < 500 else grpc.StatusCode.INTERNAL


def trailers_of(exc: MultiserveError) -> tuple[tuple[str, str], ...]:
    """The HTTP face's ``Retry-After`` as ``retry-after`` (seconds, for people and scripts) and
    as ``grpc-retry-pushback-ms``, which gRPC's own retry policy honours."""
    retry_after = (exc.headers or {}).get("Retry-After")
    if retry_after is None:
        return ()
    milliseconds = round(float(retry_after) * 1000)
    return (("retry-after", retry_after), ("grpc-retry-pushback-ms", str(milliseconds)))


async def abort(context: aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with the status of ``exc``; anything but a `MultiserveError` is logged and
    answered INTERNAL, never with a traceback."""
    if isinstance(exc, MultiserveError):
        await context.abort(code_of(exc), exc.message, trailers_of(exc))
    logger.error("unhandled error in a gRPC call", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
