"""``POST /models/{name}[/{version}]/predict``: the hot path, as a bare ASGI handler.

Why not a plain starlette endpoint: for a small model, starlette's middleware stack, router and
`Request`/`Response` objects cost more event-loop time than the inference does, and the event
loop is what a single-process server runs out of first (``benchmarks/dispatch_cost.py``
measures each step). `PredictRoutes` sits in front of the starlette app and answers the two
predict routes itself, with the same errors, headers and metrics; everything else, other
methods on these paths included, goes on to starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Receive, Scope, Send

from multiserve import codecs
from multiserve.admission import Reservation
from multiserve.batching import Finish, Inputs, Prepare
from multiserve.catalog import LATEST, VersionRecord
from multiserve.errors import (
    MalformedRequest,
    MultiserveError,
    PayloadTooLarge,
    TensorsNotServed,
    UnsupportedMediaType,
)
from multiserve.http import payload
from multiserve.http.body import declared_length
from multiserve.http.errors import answer_cancelled
from multiserve.http.responses import error_response, from_error, shutting_down
from multiserve.lifecycle import LoadedEntry
from multiserve.server import ModelServer
from multiserve.types import Array, ModelMetadata

logger = logging.getLogger("multiserve.http")

ROUTE = "/models/{name}/{version}/predict"
LATEST_ROUTE = "/models/{name}/predict"
_JSON_TYPE = codecs.JSON.encode()
_NPY_TYPE = codecs.NPY.encode()
Decode = Callable[[bytes, ModelMetadata], dict[str, Array]]


def match(path: str) -> tuple[str, str, str] | None:
    """(route template, name, version selector) for a predict path, else None. Path
    parameters match as starlette's do: one non-empty segment each."""
    parts = path.split("/")
    if len(parts) == 4 and parts[1] == "models" and parts[3] == "predict" and parts[2]:
        return LATEST_ROUTE, parts[2], LATEST
    if len(parts) == 5 and parts[1] == "models" and parts[4] == "predict" and parts[2] and parts[3]:
        return ROUTE, parts[2], parts[3]
    return None


class PredictRoutes:
    """ASGI app: answers ``POST`` on the predict routes; everything else goes to ``app``.
    Requests answered here bypass the app's metrics middleware, so this records the same
    metrics itself."""

    def __init__(self, app: ASGIApp, server: ModelServer) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = None
        if scope["type"] == "http" and scope["method"] == "POST":
            found = match(scope["path"])
        if found is None:
            if scope["type"] == "http":
                await answer_cancelled(self.app, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        route, name, selector = found
        metrics = self.server.metrics
        started = time.perf_counter()
        metrics.in_flight += 1
        status, version = 500, ""
        try:
            status, version = await predict(self.server, scope, receive, send, name, selector)
        finally:
            metrics.in_flight -= 1
            elapsed = time.perf_counter() - started
            metrics.observe_request(route, "POST", status, elapsed, name, version)


async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
    """The predict routes' endpoint inside the starlette app, for a request that reaches it
    (an app without `PredictRoutes` in front): the same answer, with the app's middleware."""
    server: ModelServer = scope["app"].state.server
    params = scope["path_params"]
    await predict(server, scope, receive, send, params["name"], params.get("version", LATEST))


async def predict(
    server: ModelServer, scope: Scope, receive: Receive, send: Send, name: str, selector: str
) -> tuple[int, str]:
    """Answer one predict request. Returns the status and the version that answered ("" if
    none did). One coroutine from the server to the model's future on the hot path (the
    model loaded, the body in one message): each coroutine between them costs on every
    resume."""
    admission = server.admission
    reservation = admission.bodies.reserve()
    try:
        limit = server.settings.max_request_bytes
        try:
            decode, wants_npy, output, timeout = _request(scope, limit)
        except UnsupportedMediaType as refused:  # unless its model takes any payload
            asked = next((v for k, v in scope["headers"] if k == b"x-request-timeout"), b"")
            return await _payload(
                server, scope, receive, send, name, selector, refused, reservation, asked
            )
        deadline = None
        if timeout or admission.request_timeout_s:
            deadline = admission.deadline(timeout)
        body = await _read_body(receive, limit, reservation)
        if not server.scanned:
            await server.wait_scanned()
        prepare = _prepare(body, decode, wants_npy, output)
        lifecycle = server.lifecycle
        try:
            submitted = lifecycle.submit(name, selector, prepare)
            if submitted is None:

                def wait(record: VersionRecord, future: asyncio.Future[bytes]) -> Awaitable[bytes]:
                    watch = receive if admission.queued else None
                    return admission.wait(record, future, deadline, watch)

                record, content = await lifecycle.infer(name, selector, prepare, wait)
            else:
                record, future = submitted
                if deadline is None and not admission.queued:
                    content = await future  # the common case: no timer, no watcher
                else:
                    # Waiting behind others: watch for the client leaving meanwhile.
                    watch = receive if admission.queued else None
                    content = await admission.wait(record, future, deadline, watch)
        except TensorsNotServed:  # its model answers payloads (a Python predictor)
            return await payload.respond(
                server, scope, receive, send, name, selector, body, None, deadline
            )
    except asyncio.CancelledError:
        # Only a shutdown cancels a request (uvicorn, at shutdown_timeout_s): a JSON 503
        # rather than uvicorn's plain-text 500. (A payload model's answer may have begun to
        # be sent: then the server refuses a second start, and the connection just closes.)
        with contextlib.suppress(RuntimeError):
            await shutting_down()(scope, receive, send)
        raise
    except MultiserveError as exc:
        await from_error(exc)(scope, receive, send)
        return exc.status_code, ""
    except Exception:
        logger.exception("unhandled error on POST %s", scope["path"])
        response = error_response(
            "internal_error", "internal server error (see the server log)", 500
        )
        await response(scope, receive, send)
        return 500, ""
    finally:
        reservation.release()
    version = str(record.version)
    headers = [
        (b"content-type", _NPY_TYPE if wants_npy else _JSON_TYPE),
        (b"content-length", str(len(content)).encode()),
        (b"x-model-name", name.encode("latin-1")),
        (b"x-model-version", version.encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": content})
    return 200, version


async def _payload(
    server: ModelServer,
    scope: Scope,
    receive: Receive,
    send: Send,
    name: str,
    selector: str,
    refused: UnsupportedMediaType,
    reservation: Reservation,
    asked: bytes,
) -> tuple[int, str]:
    """A request whose content type tensors do not come in: a payload model's, else 415."""
    if not server.scanned:
        await server.wait_scanned()
    payload.refuse_early(server, name, selector, refused)
    deadline = None
    if asked or server.admission.request_timeout_s:
        deadline = server.admission.deadline(asked)
    body = await _read_body(receive, server.settings.max_request_bytes, reservation)
    return await payload.respond(
        server, scope, receive, send, name, selector, body, refused, deadline
    )


def _request(scope: Scope, limit: int) -> tuple[Decode, bool, str | None, bytes]:
    """From the request's headers: how to decode its body, whether it wants an .npy answer,
    the output that answer holds, and the timeout the client asks for (X-Request-Timeout,
    b"" if none). 400, 413 and 415 are told here, before the body is read."""
    content_type = accept = length = timeout = b""
    for key, value in scope["headers"]:
        if key == b"content-type":
            content_type = value
        elif key == b"accept":
            accept = value
        elif key == b"content-length":
            length = value
        elif key == b"x-request-timeout":
            timeout = value
    # The common case, plain JSON, needs no parsing.
    kind = codecs.JSON
    if content_type != _JSON_TYPE:
        kind = codecs.body_kind(content_type.decode("latin-1"))
    decode: Decode = codecs.decode_npy if kind == codecs.NPY else codecs.decode_json
    declared = declared_length(length) if length else None
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"request body of {declared} bytes is over the limit of {limit} bytes"
        )
    wants_npy = _NPY_TYPE in accept
    # Only an .npy answer picks an output; parsing the query string costs on every request.
    output = _query_output(scope["query_string"]) if wants_npy else None
    return decode, wants_npy, output, timeout


def _prepare(
    body: bytes, decode: Decode, wants_npy: bool, output: str | None
) -> Callable[[LoadedEntry], Prepare[bytes]]:
    """The request's job for the model's dispatcher, once the model is known."""

    def prepare(entry: LoadedEntry) -> Prepare[bytes]:
        metadata, record = entry.model.metadata, entry.record

        def job() -> tuple[Inputs, Finish[bytes]]:
            def finish(outputs: Mapping[str, Array]) -> bytes:
                if wants_npy:
                    return codecs.encode_npy(outputs, output)
                return codecs.encode_json(record.name, record.version, outputs)

            return decode(body, metadata), finish

        return job

    return prepare


def _query_output(query_string: bytes) -> str | None:
    # As starlette reads it: blank values kept, the last of repeated keys wins.
    found = None
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "output":
            found = value
    return found


async def _read_body(receive: Receive, limit: int, reservation: Reservation) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise MalformedRequest("the client disconnected before sending the whole body")
        chunk: bytes = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
            reservation.add(len(chunk))
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
