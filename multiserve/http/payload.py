"""The predict route for payload models (`multiserve.types.PayloadModel`, e.g. a Python
predictor): the request goes to the model as it came (body, content type, query parameters,
headers) and the model's `Reply` goes back as it is, with the model's name and version headers.

`multiserve.http.predict` sends a request here only when the tensor path cannot take it: its
content type is not one tensors come in, or its model turned out to answer payloads. So a
tensor model's requests pay nothing for this route existing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from types import MappingProxyType
from urllib.parse import parse_qsl

from starlette.types import Receive, Scope, Send

from multiserve.batching import Prepare
from multiserve.catalog import VersionRecord
from multiserve.errors import (
    ModelUnavailable,
    MultiserveError,
    PredictionFailed,
    UnsupportedMediaType,
)
from multiserve.lifecycle import LoadedEntry
from multiserve.payloads import PayloadDispatcher, PayloadJob
from multiserve.server import ModelServer
from multiserve.types import PayloadRequest, Reply

# What a model's reply may not set itself: the framing is the server's, and so are the headers
# that say which model answered.
_RESERVED = frozenset(
    {
        b"content-length",
        b"content-type",
        b"transfer-encoding",
        b"connection",
        b"x-model-name",
        b"x-model-version",
    }
)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


def refuse_early(server: ModelServer, name: str, selector: str, refused: Exception) -> None:
    """Raise ``refused`` (the 415 a tensor model gives a request whose content type is not one
    tensors come in) before the body is read, unless the model takes payloads: it is loaded as
    a payload model, or, not loaded, its backend says its models are (``answers_payloads``)."""
    try:
        record = server.lifecycle.resolve(name, selector)[0]
    except MultiserveError:
        raise refused from None
    entry = server.lifecycle.cache.peek(record.key)
    if entry is not None:
        if not isinstance(entry.dispatcher, PayloadDispatcher):
            raise refused
        return
    if record.problem is not None or record.backend is None:
        return  # it cannot load: the request gets its load error
    try:
        backend = server.registry.get(record.backend)
    except MultiserveError:
        return  # not installed, or broken: the request gets that error
    if not getattr(backend, "answers_payloads", False):
        raise refused


async def respond(
    server: ModelServer,
    scope: Scope,
    receive: Receive,
    send: Send,
    name: str,
    selector: str,
    body: bytes,
    refused: UnsupportedMediaType | None,
    deadline: float | None,
) -> tuple[int, str]:
    """Answer a predict request with a payload model. ``refused`` is the 415 a tensor model
    gives this request, raised if the model turns out to be one; ``deadline``, when it is
    dropped (`multiserve.admission`). Returns the status and the version that answered."""
    prepare = _prepare(_request(scope, body), refused)
    lifecycle = server.lifecycle
    admission = server.admission

    def wait(record: VersionRecord, future: asyncio.Future[Answer]) -> Awaitable[Answer]:
        # Waiting behind others: watch for the client leaving meanwhile.
        return admission.wait(record, future, deadline, receive if admission.queued else None)

    submitted = lifecycle.submit(name, selector, prepare)
    if submitted is None:
        record, (status, headers, content) = await lifecycle.infer(name, selector, prepare, wait)
    else:
        record, future = submitted
        if deadline is None and not admission.queued:
            status, headers, content = await future
        else:
            status, headers, content = await wait(record, future)
    version = str(record.version)
    headers += [
        (b"content-length", str(len(content)).encode()),
        (b"x-model-name", name.encode("latin-1")),
        (b"x-model-version", version.encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
    return status, version


def _prepare(
    request: PayloadRequest, refused: UnsupportedMediaType | None
) -> Callable[[LoadedEntry], Prepare[Answer]]:
    def prepare(entry: LoadedEntry) -> Prepare[Answer]:
        if not isinstance(entry.dispatcher, PayloadDispatcher):
            if refused is not None:
                raise refused
            # It answered payloads a moment ago: a new version of another kind was swapped in.
            raise ModelUnavailable(
                f"{entry.record.name} changed kind while this request was routed; retry"
            )
        return PayloadJob(request, _answer)

    return prepare


def _request(scope: Scope, body: bytes) -> PayloadRequest:
    headers: dict[str, str] = {}
    for key, value in scope["headers"]:
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return PayloadRequest(body, content_type, MappingProxyType(query), MappingProxyType(headers))


def _answer(reply: Reply) -> Answer:
    """The reply as the response's status, headers and body (in the model's worker thread),
    refused with a 500 if it could not be sent as it is."""
    if not 200 <= reply.status <= 599:
        raise PredictionFailed(f"the model answered with status {reply.status!r} (not 200-599)")
    if not isinstance(reply.body, bytes):
        raise PredictionFailed(f"the model's reply body is {type(reply.body).__name__}, not bytes")
    headers = [(b"content-type", _header_value(reply.media_type, "its media type"))]
    for key, value in reply.headers:
        name = key.encode("latin-1", "replace").lower()
        if not _TOKEN.fullmatch(name) or name in _RESERVED:
            raise PredictionFailed(f"the model's reply may not set the header {key!r}")
        headers.append((name, _header_value(value, f"its header {key!r}")))
    return reply.status, headers, reply.body


def _header_value(value: str, what: str) -> bytes:
    try:
        encoded = value.encode("latin-1")
    except (UnicodeEncodeError, AttributeError):
        raise PredictionFailed(f"the model's reply has an invalid value for {what}") from None
    if _BAD_VALUE.search(encoded):
        raise PredictionFailed(f"the model's reply has a control character in {what}")
    return encoded
