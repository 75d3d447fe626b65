"""The Open Inference Protocol (KServe V2) over HTTP, with the binary tensor data and model
repository extensions, so Triton and KServe clients work unchanged.

Errors on these routes are ``{"error": "<message>"}``, as the protocol defines them.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multiserve import __version__, codecs
from multiserve.batching import Finish, Inputs, Prepare
from multiserve.catalog import LATEST, VersionRecord
from multiserve.errors import (
    Conflict,
    InvalidInput,
    MalformedRequest,
    MultiserveError,
)
from multiserve.http.admin import authorized
from multiserve.http.body import check_length, read_body
from multiserve.http.responses import ORJSONResponse
from multiserve.lifecycle import LoadedEntry, VersionState
from multiserve.server import ModelServer
from multiserve.types import Array, ModelMetadata, TensorSpec

HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"

DATATYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "string",
}
DTYPES = {dtype: datatype for datatype, dtype in DATATYPES.items()}
PLATFORMS = {
    "model.onnx": "onnxruntime_onnx",
    "model.pt": "pytorch_libtorch",
    "model.pt2": "pytorch_export",
}

Handler = Callable[[Request], Awaitable[Response]]


def v2_errors(handler: Handler) -> Handler:
    """Answer this protocol's error shape, ``{"error": "<message>"}``."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except MultiserveError as exc:
            return ORJSONResponse({"error": exc.message}, exc.status_code, exc.headers)

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
            "name": "multiserve",
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_repository"],
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
    server = _server(request)
    await server.wait_scanned()
    name = request.path_params["name"]
    async with server.lifecycle.lease(name, _selector(request)) as lease:
        record, metadata = lease.record, lease.model.metadata
    model = server.lifecycle.catalog.model(name)
    return ORJSONResponse(
        {
            "name": name,
            "versions": [str(v) for v in model.versions],
            "platform": PLATFORMS.get(record.artifact or "", record.backend or "unknown"),
            "inputs": [_tensor_metadata(spec) for spec in metadata.inputs],
            "outputs": [_tensor_metadata(spec) for spec in metadata.outputs],
        }
    )


def _tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": DTYPES[spec.dtype], "shape": list(spec.shape)}


@v2_errors
async def model_ready(request: Request) -> Response:
    """Ready when a request would be served now or after an on-demand load."""
    server = _server(request)
    await server.wait_scanned()
    name = request.path_params["name"]
    lifecycle = server.lifecycle
    record = lifecycle.resolve(name, _selector(request))[0]
    state, error = lifecycle.state(record)
    if state in (VersionState.READY, VersionState.AVAILABLE, VersionState.LOADING):
        return ORJSONResponse({"name": name, "ready": True})
    reason = error or state.value
    raise InvalidInput(f"{name} version {record.version} is not ready: {reason}")


@v2_errors
async def infer(request: Request) -> Response:
    server = _server(request)
    limit = server.settings.max_request_bytes
    check_length(request, limit)
    header_length = _header_length(request)
    body = await read_body(request, limit)
    await server.wait_scanned()

    def prepare(entry: LoadedEntry) -> Prepare[tuple[bytes, int | None]]:
        return lambda: _decode_request(entry, body, header_length)

    record, (content, json_length) = await server.lifecycle.infer(
        request.path_params["name"], _selector(request), prepare
    )
    headers = {"X-Model-Name": record.name, "X-Model-Version": str(record.version)}
    if json_length is None:
        return Response(content, media_type=codecs.JSON, headers=headers)
    headers["Inference-Header-Content-Length"] = str(json_length)
    return Response(content, media_type=BINARY, headers=headers)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not value.isdigit():
        raise MalformedRequest(f"{HEADER_LENGTH} must be a byte count, not {value!r}")
    return int(value)


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
    expected = {spec.name: spec for spec in metadata.inputs}
    named: dict[str, Array] = {}
    offset = 0
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise MalformedRequest("each input needs a string 'name'")
        name = entry["name"]
        shape = entry.get("shape")
        datatype = entry.get("datatype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers >= 0")
        if datatype not in DATATYPES:
            raise InvalidInput(
                f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
            )
        spec = expected.get(name)
        if spec is not None and DATATYPES[datatype] != spec.dtype:
            raise InvalidInput(
                f"input {name!r}: datatype {datatype} does not match the model's "
                f"{DTYPES[spec.dtype]}"
            )
        if name in named:
            raise InvalidInput(f"input {name!r} is given twice")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise MalformedRequest(f"input {name!r}: 'parameters' must be an object")
        count = int(np.prod(shape)) if shape else 1
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidInput(f"input {name!r}: binary_data_size must be an integer >= 0")
            if offset + size > len(binary):
                raise InvalidInput(f"input {name!r}: binary data runs past the end of the body")
            array = _from_binary(binary[offset : offset + size], datatype, count, name)
            offset += size
        elif "data" in entry:
            array = _from_json(entry["data"], datatype, count, name)
        else:
            raise InvalidInput(f"input {name!r} has neither 'data' nor binary_data_size")
        named[name] = array.reshape(shape)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data belong to no input")
    return codecs.check_inputs(named, metadata)


def _from_json(data: Any, datatype: str, count: int, name: str) -> Array:
    try:
        array = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInput(f"input {name!r}: 'data' is not a rectangular array") from None
    if datatype == "BYTES" and array.dtype.kind != "U" and array.size:
        raise InvalidInput(f"input {name!r}: BYTES data must be strings")
    array = array.ravel()
    if array.size != count:
        raise InvalidInput(f"input {name!r}: {array.size} values do not fill shape of {count}")
    return array


def _from_binary(chunk: bytes, datatype: str, count: int, name: str) -> Array:
    if datatype == "BYTES":
        items = []
        position = 0
        while position < len(chunk):
            if position + 4 > len(chunk):
                raise InvalidInput(f"input {name!r}: truncated BYTES element length")
            (length,) = struct.unpack_from("<I", chunk, position)
            position += 4
            if position + length > len(chunk):
                raise InvalidInput(f"input {name!r}: truncated BYTES element")
            items.append(chunk[position : position + length].decode("utf-8", "replace"))
            position += length
        array = np.array(items, dtype=np.str_)
    else:
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        if len(chunk) != count * dtype.itemsize:
            raise InvalidInput(
                f"input {name!r}: binary_data_size {len(chunk)} does not hold {count} {datatype}"
            )
        array = np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="))
    if array.size != count:
        raise InvalidInput(f"input {name!r}: {array.size} values do not fill shape of {count}")
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
            raise InvalidInput(f"unknown output {entry['name']!r}; outputs: {', '.join(names)}")
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
        datatype = _datatype(array)
        output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunk = _to_binary(array, datatype)
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


def _datatype(array: Array) -> str:
    if array.dtype.kind in "UOS":
        return "BYTES"
    datatype = DTYPES.get(array.dtype.name)
    if datatype is None:
        raise MultiserveError(f"output dtype {array.dtype} has no V2 datatype")
    return datatype


def _to_binary(array: Array, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in np.ravel(array):
            encoded = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


# --- the model repository extension (admin token required) ---------------------------------

_REPOSITORY_STATES = {
    VersionState.READY: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.AVAILABLE: "UNAVAILABLE",
    VersionState.SETTLING: "UNAVAILABLE",
    VersionState.FAILED: "UNAVAILABLE",
}


@v2_errors
async def repository_index(request: Request) -> Response:
    server = authorized(request)
    await server.wait_scanned()
    body = await request.body()
    only_ready = False
    if body.strip():
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
        only_ready = bool(payload.get("ready", False)) if isinstance(payload, dict) else False
    lifecycle = server.lifecycle
    index = []
    for record in lifecycle.catalog.records():
        state, error = lifecycle.state(record)
        if only_ready and state is not VersionState.READY:
            continue
        reason = error or {"available": "unloaded", "ready": ""}.get(state.value, state.value)
        index.append(
            {
                "name": record.name,
                "version": str(record.version),
                "state": _REPOSITORY_STATES[state],
                "reason": reason,
            }
        )
    return ORJSONResponse(index)


@v2_errors
async def repository_load(request: Request) -> Response:
    server = authorized(request)
    await server.load(request.path_params["name"], LATEST)
    return ORJSONResponse({})


@v2_errors
async def repository_unload(request: Request) -> Response:
    """Unload every loaded version of the model (each drains first)."""
    server = authorized(request)
    await server.wait_scanned()
    name = request.path_params["name"]
    model = server.lifecycle.catalog.model(name)
    pinned = [v for v in model.versions if server.lifecycle.cache.is_pinned((name, v))]
    if pinned:
        raise Conflict(
            f"{name} has pinned versions ({', '.join(map(str, pinned))}): unpin them first"
        )
    for version in model.versions:
        await server.lifecycle.evict((name, version))
    return ORJSONResponse({})


ROUTES = [
    Route("/v2", server_metadata, methods=["GET"]),
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
