"""The Open Inference Protocol (KServe V2) apart from any transport: its datatypes, tensors to
and from numpy, and the answers that the HTTP face (`multiserve.http.v2`) and the gRPC face
(`multiserve.grpc`) both give, with the same error messages.

Binary tensors are laid out the same way in both: row-major, little-endian, and a ``BYTES``
element as a 4-byte little-endian length followed by its bytes (HTTP's binary tensor data
extension, gRPC's ``raw_input_contents`` / ``raw_output_contents``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from multiserve import codecs
from multiserve.catalog import LATEST
from multiserve.errors import Conflict, InvalidInput, MultiserveError
from multiserve.lifecycle import VersionState
from multiserve.server import ModelServer
from multiserve.types import Array, ModelMetadata, TensorSpec

SERVER_NAME = "multiserve"
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
_REPOSITORY_STATES = {
    VersionState.READY: "READY",
    VersionState.LOADING: "LOADING",
    VersionState.DOWNLOADING: "LOADING",
    VersionState.AVAILABLE: "UNAVAILABLE",
    VersionState.SETTLING: "UNAVAILABLE",
    VersionState.FAILED: "UNAVAILABLE",
}


# --- tensors --------------------------------------------------------------------------------


# Largest element count a shape may declare: a request's body holds at most max_request_bytes,
# and a count past int64 cannot even be indexed (numpy refuses such a shape with ValueError).
MAX_ELEMENTS = 2**62
MAX_RANK = 32  # numpy's limit is 64; no model takes tensors of more dimensions than this


def check_shape(name: str, shape: Sequence[Any]) -> list[int]:
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers >= 0")
    if len(shape) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: 'shape' has {len(shape)} dimensions (most {MAX_RANK})")
    # Each dimension, not only the product: [0, 2**63] holds no elements, but no array has it.
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise InvalidInput(f"input {name!r}: 'shape' {list(shape)} is too large (over 2**62)")
    return list(shape)


def check_datatype(name: str, datatype: Any, spec: TensorSpec | None) -> str:
    """``datatype`` if it is one of the protocol's and matches the model's input ``spec``."""
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
        )
    if spec is not None and DATATYPES[datatype] != spec.dtype:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} does not match the model's {DTYPES[spec.dtype]}"
        )
    return str(datatype)


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_count(name: str, size: int, count: int) -> None:
    if size != count:
        raise InvalidInput(f"input {name!r}: {size} values do not fill shape of {count}")


def from_binary(chunk: bytes, datatype: str, count: int, name: str) -> Array:
    """The ``count`` elements of a binary tensor, flat."""
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
                f"input {name!r}: {len(chunk)} bytes of binary data do not hold {count} {datatype}"
            )
        array = np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="))
    check_count(name, array.size, count)
    return array


def to_binary(array: Array, datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in np.ravel(array):
            encoded = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def datatype_of(array: Array) -> str:
    if array.dtype.kind in "UOS":
        return "BYTES"
    datatype = DTYPES.get(array.dtype.name)
    if datatype is None:
        raise MultiserveError(f"output dtype {array.dtype} has no V2 datatype")
    return datatype


class InputSet:
    """The named input tensors of one request, each given once, checked against the model."""

    def __init__(self, metadata: ModelMetadata) -> None:
        self.metadata = metadata
        self.specs = {spec.name: spec for spec in metadata.inputs}
        self.named: dict[str, Array] = {}

    def spec(self, name: str) -> TensorSpec | None:
        return self.specs.get(name)

    def add(self, name: str, flat: Array, shape: Sequence[int]) -> None:
        if name in self.named:
            raise InvalidInput(f"input {name!r} is given twice")
        try:
            self.named[name] = flat.reshape(shape)
        except ValueError:
            raise InvalidInput(
                f"input {name!r}: {flat.size} values do not fit shape {list(shape)}"
            ) from None

    def checked(self) -> dict[str, Array]:
        return codecs.check_inputs(self.named, self.metadata)


def unknown_output(name: str, metadata: ModelMetadata) -> InvalidInput:
    names = ", ".join(spec.name for spec in metadata.outputs)
    return InvalidInput(f"unknown output {name!r}; outputs: {names}")


def requested_outputs(names: Iterable[str], metadata: ModelMetadata) -> list[str]:
    """The outputs to return, in the request's order; all of the model's when it names none."""
    known = {spec.name for spec in metadata.outputs}
    wanted = list(names)
    for name in wanted:
        if name not in known:
            raise unknown_output(name, metadata)
    return wanted or [spec.name for spec in metadata.outputs]


# --- the answers ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorDescription:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True, slots=True)
class ModelDescription:
    name: str
    version: int  # the version the selector resolved to
    versions: list[str]
    platform: str
    inputs: list[TensorDescription]
    outputs: list[TensorDescription]


def _described(spec: TensorSpec) -> TensorDescription:
    return TensorDescription(spec.name, DTYPES[spec.dtype], list(spec.shape))


async def describe_model(server: ModelServer, name: str, selector: str) -> ModelDescription:
    """Model metadata. Inputs and outputs are known once loaded, so this loads the version."""
    await server.wait_scanned()
    async with server.lifecycle.lease(name, selector) as lease:
        record, metadata = lease.record, lease.model.metadata
    model = server.lifecycle.catalog.model(name)
    return ModelDescription(
        name=name,
        version=record.version,
        versions=[str(v) for v in model.versions],
        platform=PLATFORMS.get(record.artifact or "", record.backend or "unknown"),
        inputs=[_described(spec) for spec in metadata.inputs],
        outputs=[_described(spec) for spec in metadata.outputs],
    )


async def not_ready_reason(server: ModelServer, name: str, selector: str) -> str | None:
    """None when a request for the model would be served now or after an on-demand load; else
    why not, in the words both faces use. Raises NotFound for an unknown model or version."""
    await server.wait_scanned()
    lifecycle = server.lifecycle
    record = lifecycle.resolve(name, selector or LATEST)[0]
    state, error = lifecycle.state(record)
    if state in (VersionState.READY, VersionState.AVAILABLE, VersionState.LOADING):
        return None
    return f"{name} version {record.version} is not ready: {error or state.value}"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    name: str
    version: str
    state: str  # READY, LOADING or UNAVAILABLE, as Triton says it
    reason: str


async def repository_index(server: ModelServer, only_ready: bool) -> list[IndexEntry]:
    """Every version in the repository and its state (the repository extension's index)."""
    await server.wait_scanned()
    lifecycle = server.lifecycle
    index = []
    for record in lifecycle.catalog.records():
        state, error = lifecycle.state(record)
        if only_ready and state is not VersionState.READY:
            continue
        reason = error or {"available": "unloaded", "ready": ""}.get(state.value, state.value)
        index.append(
            IndexEntry(record.name, str(record.version), _REPOSITORY_STATES[state], reason)
        )
    return index


async def load_model(server: ModelServer, name: str) -> None:
    """Load the model's latest version ahead of traffic (the repository extension's load)."""
    await server.load(name, LATEST)


async def unload_model(server: ModelServer, name: str) -> None:
    """Unload every loaded version of the model (each drains first)."""
    await server.wait_scanned()
    model = server.lifecycle.catalog.model(name)
    pinned = [v for v in model.versions if server.lifecycle.cache.is_pinned((name, v))]
    if pinned:
        raise Conflict(
            f"{name} has pinned versions ({', '.join(map(str, pinned))}): unpin them first"
        )
    for version in model.versions:
        await server.lifecycle.evict((name, version))
