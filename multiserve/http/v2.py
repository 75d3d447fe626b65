"""The Open Inference Protocol (KServe V2) over HTTP, with the binary tensor data and model
repository extensions, so Triton and KServe clients work unchanged.

Errors on these routes are ``{"error": "<message>"}``, as the protocol defines them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multiserve import __version__, codecs, extensions, protocol
from multiserve.admission import ADMIN_BODY_BYTES, TIMEOUT_HEADER
from multiserve.batching import Finish, Inputs, Prepare
from multiserve.catalog import LATEST, VersionRecord
from multiserve.errors import (
    InvalidInput,
    MalformedRequest,
    MultiserveError,
)
from multiserve.http.admin import authorized
from multiserve.http.body import check_length, declared_length, read_body
from multiserve.http.responses import ORJSONResponse
from multiserve.lifecycle import LoadedEntry
from multiserve.server import ModelServer
from multiserve.types import Array, ModelMetadata

logger = logging.getLogger("multiserve.http")

HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"

Handler = Callable[[Request], Awaitable[Response]]


def v2_errors(handler: Handler) -> Handler:
    """Answer this protocol's error shape, ``{"error": "<message>"}``."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except MultiserveError as exc:
            return ORJSONResponse({"error": exc.message}, exc.status_code, exc.headers)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            return ORJSONResponse({"error": "internal server error (see the server log)"}, 500)

    return wrapped


def _server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.server
    return server


def _selector(request: Request) -> str:
    return str(request.path_params.get("version", LATEST))


@v2_errors
async def server_metadata(request: Request) -> Response:
    return ORJSONResponse(
        {
            "name": protocol.SERVER_NAME,
            "version": __version__,
            "extensions": [
                "binary_tensor_data",
                "model_repository",
                "model_configuration",
                "statistics",
            ],
        }
    )


@v2_errors
async def live(request: Request) -> Response:
    return ORJSONResponse({"live": True})


@v2_errors
async def ready(request: Request) -> Response:
    server = _server(request)
    return ORJSONResponse({"ready": server.ready}, 200 if server.ready else 503)


@v2_errors
async def model_metadata(request: Request) -> Response:
    described = await protocol.describe_model(
        _server(request), request.path_params["name"], _selector(request)
    )
    return ORJSONResponse(
        {
            "name": described.name,
            "versions": described.versions,
            "platform": described.platform,
            "inputs": [_tensor_metadata(t) for t in described.inputs],
            "outputs": [_tensor_metadata(t) for t in described.outputs],
        }
    )


def _tensor_metadata(tensor: protocol.TensorDescription) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}


@v2_errors
async def model_ready(request: Request) -> Response:
    """Ready when a request would be served now or after an on-demand load."""
    name = request.path_params["name"]
    reason = await protocol.not_ready_reason(_server(request), name, _selector(request))
    if reason is not None:
        raise InvalidInput(reason)
    return ORJSONResponse({"name": name, "ready": True})


@v2_errors
async def infer(request: Request) -> Response:
    server = _server(request)
    admission = server.admission
    limit = server.settings.max_request_bytes
    check_length(request, limit)
    header_length = _header_length(request)
    deadline = admission.deadline(request.headers.get(TIMEOUT_HEADER))
    reservation = admission.bodies.reserve()
    try:
        body = await read_body(request, limit, reservation)
        await server.wait_scanned()

        def prepare(entry: LoadedEntry) -> Prepare[tuple[bytes, int | None]]:
            return lambda: _decode_request(entry, body, header_length)

        def wait(
            record: VersionRecord, future: asyncio.Future[tuple[bytes, int | None]]
        ) -> Awaitable[tuple[bytes, int | None]]:
            watch = request.receive if admission.queued else None
            return admission.wait(record, future, deadline, watch)

        record, (content, json_length) = await server.lifecycle.infer(
            request.path_params["name"], _selector(request), prepare, wait
        )
    finally:
        reservation.release()
    headers = {"X-Model-Name": record.name, "X-Model-Version": str(record.version)}
    if json_length is None:
        return Response(content, media_type=codecs.JSON, headers=headers)
    headers["Inference-Header-Content-Length"] = str(json_length)
    return Response(content, media_type=BINARY, headers=headers)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value:
        raise MalformedRequest(f"{HEADER_LENGTH} must be a byte count, not ''")
    return declared_length(value, HEADER_LENGTH)


def _decode_request(
    entry: LoadedEntry, body: bytes, header_length: int | None
) -> tuple[Inputs, Finish[tuple[bytes, int | None]]]:
    """The model's inputs from an inference request, and how to encode its answer (in the
    model's worker thread)."""
    if header_length is None:
        header, binary = body, b""
    else:
        if header_length > len(body):
            raise MalformedRequest(
                f"{HEADER_LENGTH} is {header_length} but the body has {len(body)} bytes"
            )
        header, binary = body[:header_length], body[header_length:]
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"inference request is not valid JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise MalformedRequest('expected an inference request {"inputs": [...]}')
    metadata = entry.model.metadata
    inputs = _decode_inputs(request["inputs"], binary, metadata)
    wanted = _requested_outputs(request, metadata)
    record, request_id = entry.record, request.get("id")
    return inputs, lambda outputs: _encode_response(record, request_id, outputs, wanted)


def _decode_inputs(entries: list[Any], binary: bytes, metadata: ModelMetadata) -> dict[str, Array]:
    inputs = protocol.InputSet(metadata)
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise MalformedRequest("each input needs a string 'name'")
        name = entry["name"]
        shape = entry.get("shape")
        if not isinstance(shape, list):
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers >= 0")
        shape = protocol.check_shape(name, shape)
        datatype = protocol.check_datatype(name, entry.get("datatype"), inputs.spec(name))
        if name in inputs.named:
            raise InvalidInput(f"input {name!r} is given twice")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise MalformedRequest(f"input {name!r}: 'parameters' must be an object")
        count = protocol.element_count(shape)
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be an integer >= 0")
            if offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary data runs past the end of the body")
            array = protocol.from_binary(binary[offset : offset + size], datatype, count, name)
            offset += size
        elif "data" in entry:
            array = _from_json(entry["data"], datatype, count, name)
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
        inputs.add(name, array, shape)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    return inputs.checked()


def _from_json(data: Any, datatype: str, count: int, name: str) -> Array:
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {name!r}: 'data' is not a rectangular array") from None
    if datatype == "BYTES" and array.dtype.kind != "U" and array.size:
        raise InvalidInput(f"input {name!r}: BYTES data must be strings")
    array = array.ravel()
    protocol.check_count(name, array.size, count)
    return array


def _requested_outputs(request: dict[str, Any], metadata: ModelMetadata) -> list[tuple[str, bool]]:
    """(output name, as binary) for each output to return, in the model's order when the
    request names none."""
    parameters = request.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MalformedRequest("'parameters' must be an object")
    all_binary = bool(parameters.get("binary_data_output", False))
    requested = request.get("outputs")
    names = [spec.name for spec in metadata.outputs]
    if requested is None:
        return [(name, all_binary) for name in names]
    if not isinstance(requested, list):
        raise MalformedRequest("'outputs' must be a list")
    wanted = []
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise MalformedRequest("each requested output needs a string 'name'")
        if entry["name"] not in names:
            raise protocol.unknown_output(entry["name"], metadata)
        output_parameters = entry.get("parameters") or {}
        if not isinstance(output_parameters, dict):
            raise MalformedRequest(f"output {entry['name']!r}: 'parameters' must be an object")
        binary = output_parameters.get("binary_data", all_binary)
        wanted.append((entry["name"], bool(binary)))
    return wanted


def _encode_response(
    record: VersionRecord,
    request_id: Any,
    outputs: dict[str, Array],
    wanted: list[tuple[str, bool]],
) -> tuple[bytes, int | None]:
    described = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        array = outputs[name]
        datatype = protocol.datatype_of(array)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunk = protocol.to_binary(array, datatype)
            output["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            output["data"] = np.ascontiguousarray(array).ravel()
        described.append(output)
    response: dict[str, Any] = {
        "model_name": record.name,
        "model_version": str(record.version),
        "outputs": described,
    }
    if isinstance(request_id, str):
        response["id"] = request_id
    header = codecs.dumps(response)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


# --- the model configuration and statistics extensions ------------------------------------


@v2_errors
async def model_config(request: Request) -> Response:
    config = await extensions.model_config(
        _server(request), request.path_params["name"], request.path_params.get("version", "")
    )
    return ORJSONResponse(extensions.to_json(config))


@v2_errors
async def model_statistics(request: Request) -> Response:
    """Triton's statistics: of one version, of every version of a model, or of every model
    (``/v2/models/stats``)."""
    response = await extensions.model_statistics(
        _server(request),
        request.path_params.get("name", ""),
        request.path_params.get("version", ""),
    )
    return ORJSONResponse(extensions.to_json(response))


# --- the model repository extension (admin token required) ---------------------------------


@v2_errors
async def repository_index(request: Request) -> Response:
    server = authorized(request)
    check_length(request, ADMIN_BODY_BYTES)
    body = await read_body(request, ADMIN_BODY_BYTES)
    only_ready = False
    if body.strip():
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
        only_ready = bool(payload.get("ready", False)) if isinstance(payload, dict) else False
    index = await protocol.repository_index(server, only_ready)
    return ORJSONResponse(
        [
            {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
            for e in index
        ]
    )


@v2_errors
async def repository_load(request: Request) -> Response:
    server = authorized(request)
    await protocol.load_model(server, request.path_params["name"])
    return ORJSONResponse({})


@v2_errors
async def repository_unload(request: Request) -> Response:
    """Unload every loaded version of the model (each drains first)."""
    server = authorized(request)
    await protocol.unload_model(server, request.path_params["name"])
    return ORJSONResponse({})


ROUTES = [
    Route("/v2", server_metadata, methods=["GET"]),
    # Before /v2/models/{name}, which would take "stats" for a model's name.
    Route("/v2/models/stats", model_statistics, methods=["GET"]),
    Route("/v2/models/{name}/config", model_config, methods=["GET"]),
    Route("/v2/models/{name}/stats", model_statistics, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/config", model_config, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/stats", model_statistics, methods=["GET"]),
    Route("/v2/health/live", live, methods=["GET"]),
    Route("/v2/health/ready", ready, methods=["GET"]),
    Route("/v2/models/{name}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/infer", infer, methods=["POST"]),
    Route("/v2/models/{name}/versions/{version}", model_metadata, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/ready", model_ready, methods=["GET"]),
    Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    Route("/v2/repository/index", repository_index, methods=["POST"]),
    Route("/v2/repository/models/{name}/load", repository_load, methods=["POST"]),
    Route("/v2/repository/models/{name}/unload", repository_unload, methods=["POST"]),
]
