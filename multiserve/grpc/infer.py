"""``ModelInfer``'s messages to numpy and back, run in the model's worker thread.

Inputs come as ``raw_input_contents`` (what tritonclient sends: the binary layout of
`multiserve.protocol`) or as typed ``contents`` (what clients generated from the ``.proto`` often
send). The answer takes the same form: ``raw_output_contents`` for a raw request, typed
``contents`` for a typed one, except that an FP16 output has no typed field and makes the whole
answer raw (the protocol allows one form per answer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from multiserve import protocol
from multiserve.batching import Finish, Inputs, Prepare
from multiserve.errors import InvalidInput
from multiserve.lifecycle import LoadedEntry
from multiserve.types import Array

# The typed field each datatype's values travel in, and the numpy type that field holds.
_FIELDS = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", np.object_),
}


def prepare(
    request: Any, on_resolved: Callable[[LoadedEntry], None], *, stream: bool
) -> Callable[[LoadedEntry], Prepare[bytes]]:
    """The job `Lifecycle.infer` runs for one ``ModelInferRequest``: decode, and encode the
    answer as a serialized ``ModelInferResponse`` (in a ``ModelStreamInferResponse`` when
    ``stream``). ``on_resolved`` learns which version serves it (on the event loop, before the
    job is queued)."""

    def job_for(entry: LoadedEntry) -> Prepare[bytes]:
        on_resolved(entry)
        return lambda: decode(entry, request, stream)

    return job_for


def decode(entry: LoadedEntry, request: Any, stream: bool) -> tuple[Inputs, Finish[bytes]]:
    inputs = protocol.InputSet(entry.model.metadata)
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        shape = protocol.check_shape(name, tensor.shape)
        datatype = protocol.check_datatype(name, tensor.datatype, inputs.spec(name))
        count = protocol.element_count(shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {name!r}: contents and raw_input_contents cannot be mixed"
                )
            flat = protocol.from_binary(raw[index], datatype, count, name)
        else:
            flat = _from_contents(tensor.contents, datatype, count, name)
        inputs.add(name, flat, shape)
    named = inputs.checked()
    wanted = protocol.requested_outputs(
        (output.name for output in request.outputs), entry.model.metadata
    )
    record, request_id, use_raw = entry.record, request.id, bool(raw)

    def finish(outputs: dict[str, Array]) -> bytes:
        response = pb.ModelInferResponse(
            model_name=record.name, model_version=str(record.version), id=request_id
        )
        arrays = [(name, outputs[name], protocol.datatype_of(outputs[name])) for name in wanted]
        raw_answer = use_raw or any(datatype == "FP16" for _, _, datatype in arrays)
        for name, array, datatype in arrays:
            output = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if raw_answer:
                response.raw_output_contents.append(protocol.to_binary(array, datatype))
            else:
                _to_contents(output.contents, array, datatype)
        if stream:
            response = pb.ModelStreamInferResponse(infer_response=response)
        data: bytes = response.SerializeToString()
        return data

    return named, finish


def _from_contents(contents: Any, datatype: str, count: int, name: str) -> Array:
    if datatype not in _FIELDS:
        raise InvalidInput(f"input {name!r}: {datatype} has no typed contents: send it raw")
    field, wire_type = _FIELDS[datatype]
    given = [descriptor.name for descriptor, _ in contents.ListFields()]
    if any(other != field for other in given):
        raise InvalidInput(
            f"input {name!r}: {datatype} values go in contents.{field}, not {', '.join(given)}"
        )
    values = getattr(contents, field)
    protocol.check_count(name, len(values), count)
    if datatype == "BYTES":
        return np.array([v.decode("utf-8", "replace") for v in values], dtype=np.str_)
    array: Array = np.array(values, dtype=wire_type)
    target = np.dtype(protocol.DATATYPES[datatype])
    if target != array.dtype:
        limits = np.iinfo(target)
        if array.size and (array.min() < limits.min or array.max() > limits.max):
            raise InvalidInput(f"input {name!r}: a value is out of range for {datatype}")
        array = array.astype(target)
    return array


def _to_contents(contents: Any, array: Array, datatype: str) -> None:
    field, _ = _FIELDS[datatype]
    flat = np.ravel(array)
    if datatype == "BYTES":
        values = [v if isinstance(v, bytes) else str(v).encode() for v in flat]
        getattr(contents, field).extend(values)
    else:
        getattr(contents, field).extend(flat.tolist())
