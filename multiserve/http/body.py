"""Reading request bodies within ``max_request_bytes``, and within the process's budget of
bytes being received (`multiserve.admission.BodyBudget`)."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from multiserve.admission import Reservation
from multiserve.errors import MalformedRequest, PayloadTooLarge

# A byte count longer than this is over any limit; parsing it would only cost (and Python
# refuses int() of more than 4300 digits).
_MAX_DIGITS = 19
_OVER_ANY_LIMIT = 10_000_000_000_000_000_000


def declared_length(value: str | bytes, what: str = "content-length") -> int | None:
    """A byte-count header's value: None when absent (empty), MalformedRequest (400) when it is
    not ASCII digits (``str.isdigit`` takes '²' and other digits ``int`` refuses). A count of
    more than 19 digits is returned as a number larger than any limit."""
    if not value:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise MalformedRequest(f"{what} must be a byte count, not {text[:40]!r}")
    if len(text) > _MAX_DIGITS:
        return _OVER_ANY_LIMIT
    return int(text)


def check_length(request: Request, limit: int) -> None:
    length = declared_length(request.headers.get("content-length", ""))
    if length is not None and length > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")


async def read_body(request: Request, limit: int, reservation: Reservation | None = None) -> bytes:
    """The whole body, refused with 413 past ``limit``; each chunk is first reserved in
    ``reservation`` (503 once the process holds too many bytes being received)."""
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            if reservation is not None:
                reservation.add(len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:
        raise MalformedRequest("the client disconnected before sending the whole body") from None
    return b"".join(chunks)
