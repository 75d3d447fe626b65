"""Reading request bodies within ``max_request_bytes``."""

from __future__ import annotations

from starlette.requests import ClientDisconnect, Request

from multiserve.errors import MalformedRequest, PayloadTooLarge


def check_length(request: Request, limit: int) -> None:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")


async def read_body(request: Request, limit: int) -> bytes:
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise MalformedRequest("the client disconnected before sending the whole body") from None
    return b"".join(chunks)
