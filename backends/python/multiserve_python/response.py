"""What a predictor's ``predict`` may return, and how it becomes the HTTP answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from multiserve.types import PredictionFailed, Reply

JSON = "application/json"
BYTES = "application/octet-stream"
TEXT = "text/plain; charset=utf-8"


class Response:
    """Returned by ``predict`` to choose the answer's status, headers or media type.

    ``content`` is sent as JSON (numpy arrays and scalars included), except ``bytes`` (sent as
    they are, ``application/octet-stream`` unless ``media_type`` says otherwise) and ``str``
    (``text/plain``). A ``Content-Type`` in ``headers`` is the same as ``media_type``.

        return Response({"error": "no rows"}, status=422)
        return Response(png_bytes, media_type="image/png", headers={"Cache-Control": "no-store"})
    """

    __slots__ = ("content", "headers", "media_type", "status")

    def __init__(
        self,
        content: Any = None,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ) -> None:
        self.content = content
        self.status = status
        self.headers = dict(headers or {})
        self.media_type = media_type

    def __repr__(self) -> str:
        return f"Response(status={self.status!r}, media_type={self.media_type!r})"


def to_reply(result: Any) -> Reply:
    """``predict``'s return value as a `Reply`; `PredictionFailed` if it cannot be sent."""
    if isinstance(result, Response):
        return _from_response(result)
    if isinstance(result, bytes | bytearray | memoryview):
        return Reply(bytes(result), media_type=BYTES)
    return Reply(_json(result))


def _from_response(response: Response) -> Reply:
    if not isinstance(response.status, int) or isinstance(response.status, bool):
        raise PredictionFailed(f"Response status must be an integer, not {response.status!r}")
    headers: list[tuple[str, str]] = []
    media_type = response.media_type
    for key, value in response.headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise PredictionFailed(f"Response headers must be strings: {key!r}: {value!r}")
        if key.lower() == "content-type":
            media_type = media_type or value
        else:
            headers.append((key, value))
    content = response.content
    if isinstance(content, bytes | bytearray | memoryview):
        body, default = bytes(content), BYTES
    elif isinstance(content, str):
        body, default = content.encode(), TEXT
    else:
        body, default = _json(content), JSON
    return Reply(body, response.status, media_type or default, tuple(headers))


def _json(value: Any) -> bytes:
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_default)
    except TypeError as exc:
        raise PredictionFailed(
            f"the predictor returned {type(value).__name__}, which is not JSON-serialisable "
            f"({exc}): return JSON values, numpy arrays, bytes or a Response"
        ) from None


def _default(value: Any) -> Any:
    # orjson serialises contiguous numeric arrays itself and hands the rest (strided views,
    # string arrays, numpy scalars) here.
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")
