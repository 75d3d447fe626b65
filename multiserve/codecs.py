"""Request bodies to numpy inputs checked against a model's metadata, and outputs to bodies.

Everything here is CPU work on possibly large payloads, so it runs in a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from multiserve import npy
from multiserve.errors import InvalidInput, MalformedRequest, NotAcceptable, UnsupportedMediaType
from multiserve.types import NUMPY_DTYPES, Array, ModelMetadata, TensorSpec

JSON = "application/json"
NPY = "application/x-npy"

# Source dtype kinds that may be cast to a target kind without losing meaning.
_CASTABLE = {
    "f": "biuf",
    "i": "biu",
    "u": "biu",
    "b": "b",
    "U": "U",
}


# Per tensor dtype: the numpy dtype, the source kinds that may be cast to it, and whether its
# values need a range check (the integers).
_TARGETS = {
    name: (dtype, _CASTABLE.get(dtype.kind, ""), dtype.kind in "iu")
    for name, dtype in NUMPY_DTYPES.items()
}


def body_kind(content_type: str) -> str:
    """JSON or NPY for a request's Content-Type (none means JSON); 415 for anything else."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in ("", JSON):
        return JSON
    if media_type == NPY:
        return NPY
    hint = ""
    if media_type == "application/x-www-form-urlencoded":
        hint = f" (curl -d sends this type: add -H 'Content-Type: {JSON}')"
    raise UnsupportedMediaType(
        f"content type {media_type!r} is not supported; send {JSON} or {NPY}{hint}"
    )


def decode_json(body: bytes, metadata: ModelMetadata) -> dict[str, Array]:
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or "inputs" not in payload:
        raise MalformedRequest('expected a JSON object {"inputs": ...}')
    inputs = payload["inputs"]
    if isinstance(inputs, dict):
        return check_inputs(inputs, metadata)
    if len(metadata.inputs) != 1:
        raise InvalidInput(
            f"the model has {len(metadata.inputs)} inputs ({_names(metadata.inputs)}): "
            'send {"inputs": {"<input name>": [...], ...}}'
        )
    spec = metadata.inputs[0]
    return {spec.name: _to_array(inputs, spec)}


def decode_npy(body: bytes, metadata: ModelMetadata) -> dict[str, Array]:
    if len(metadata.inputs) != 1:
        raise InvalidInput(
            f"{NPY} bodies are for single-input models; this model has inputs "
            f"{_names(metadata.inputs)}: send JSON"
        )
    try:
        array = npy.load(body)
    except (ValueError, OSError, EOFError, SyntaxError, MemoryError) as exc:
        raise MalformedRequest(f"request body is not a valid .npy file: {exc}") from None
    return check_inputs({metadata.inputs[0].name: array}, metadata)


def check_inputs(named: Mapping[str, object], metadata: ModelMetadata) -> dict[str, Array]:
    """Arrays for exactly the model's inputs, cast to their dtypes, with rank and fixed
    dimensions checked; InvalidInput (400) naming the input otherwise."""
    specs = metadata.inputs
    if len(named) != len(specs) or any(spec.name not in named for spec in specs):
        expected = {spec.name for spec in specs}
        unknown = sorted(set(named) - expected)
        if unknown:
            raise InvalidInput(
                f"unknown input {', '.join(map(repr, unknown))}; the model's inputs are "
                f"{_names(specs)}"
            )
        missing = [spec.name for spec in specs if spec.name not in named]
        raise InvalidInput(f"missing input {', '.join(map(repr, missing))}")
    return {spec.name: _to_array(named[spec.name], spec) for spec in specs}


def _to_array(value: object, spec: TensorSpec) -> Array:
    try:
        array = value if type(value) is np.ndarray else np.asarray(value)
    except (ValueError, TypeError):
        raise InvalidInput(
            f"input {spec.name!r}: not a rectangular array (nested lists of unequal lengths?)"
        ) from None
    target, castable, integral = _TARGETS[spec.dtype]
    kind = array.dtype.kind
    if kind not in castable:
        raise InvalidInput(
            f"input {spec.name!r}: expected {spec.dtype} values, got {_kind_name(array)}"
        )
    if integral and kind in "iu" and array.size:
        info = np.iinfo(target)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidInput(
                f"input {spec.name!r}: values out of range for {spec.dtype} "
                f"[{info.min}, {info.max}]"
            )
    shape = array.shape
    want = spec.shape
    if len(shape) != len(want):
        raise _wrong_shape(spec, shape)
    for dim, got in zip(want, shape):  # noqa: B905 (lengths checked above)
        if dim != got and dim != -1:
            raise _wrong_shape(spec, shape)
    return array if target.kind == "U" else array.astype(target, copy=False)


def _wrong_shape(spec: TensorSpec, shape: tuple[int, ...]) -> InvalidInput:
    return InvalidInput(
        f"input {spec.name!r}: expected shape {_shape(spec.shape)}, got {_shape(shape)}"
    )


def dumps(value: Any) -> bytes:
    """The one JSON encoder: numpy arrays and scalars included."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY, default=_json_default)


def encode_json(name: str, version: int, outputs: Mapping[str, Array]) -> bytes:
    return dumps({"model_name": name, "model_version": str(version), "outputs": outputs})


def encode_npy(outputs: Mapping[str, Array], output: str | None) -> bytes:
    if output is None:
        if len(outputs) != 1:
            raise NotAcceptable(
                f"the model has {len(outputs)} outputs ({', '.join(outputs)}); an {NPY} "
                "response holds one: add ?output=<name>, or accept application/json"
            )
        output = next(iter(outputs))
    if output not in outputs:
        raise InvalidInput(f"unknown output {output!r}; outputs: {', '.join(outputs)}")
    return npy.save(outputs[output])


def _json_default(value: Any) -> Any:
    # orjson serialises contiguous numeric arrays itself and hands the rest (strided views,
    # strings, numpy scalars) here.
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot serialise {type(value).__name__} as JSON")


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(repr(spec.name) for spec in specs)


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _kind_name(array: Array) -> str:
    kind = array.dtype.kind
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "floats", "U": "strings"}.get(
        kind, "values of mixed or unsupported types"
    )
