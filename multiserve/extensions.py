"""Triton's model configuration and statistics extensions, for both faces: the gRPC
``ModelConfig`` / ``ModelStatistics`` RPCs answer these messages, and HTTP's
``/v2/models/{name}[/versions/{v}]/config`` and ``/stats`` answer them as JSON (`to_json`).

Statistics come from the metrics: successful and failed prediction requests over both
protocols with their time, and the model's executions (``compute_infer``). multiserve does not
time a request's wait in its model's queue apart from the rest, so ``queue``,
``compute_input`` and ``compute_output`` stay zero.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as config_pb
from tritonclient.grpc import service_pb2 as pb

from multiserve import protocol
from multiserve.catalog import LATEST
from multiserve.server import ModelServer


async def model_config(server: ModelServer, name: str, version: str) -> Any:
    """Triton's model configuration, as far as multiserve has one: the tensors, the
    platform and backend, the version policy and dynamic batching. A model that batches
    has ``max_batch_size`` > 0 and dims without the batch dimension, as in Triton."""
    described = await protocol.describe_model(server, name, version or LATEST)
    record = server.lifecycle.catalog.model(name).versions[described.version]
    batch = record.max_batch_size or server.settings.max_batch_size
    skip = 1 if batch > 1 else 0
    policy = record.version_policy or server.settings.version_policy
    config = config_pb.ModelConfig(
        name=described.name,
        platform=described.platform,
        backend=record.backend or "",
        max_batch_size=batch if batch > 1 else 0,
        input=[
            config_pb.ModelInput(name=t.name, data_type=_type(t), dims=t.shape[skip:])
            for t in described.inputs
        ],
        output=[
            config_pb.ModelOutput(name=t.name, data_type=_type(t), dims=t.shape[skip:])
            for t in described.outputs
        ],
    )
    if policy == "all":
        config.version_policy.all.SetInParent()
    else:
        config.version_policy.latest.num_versions = 1
    if batch > 1:
        config.dynamic_batching.SetInParent()
    return config


async def model_statistics(server: ModelServer, name: str, version: str) -> Any:
    """A ``ModelStatisticsResponse``: per version of ``name`` (of every model when empty; of
    ``version`` alone when given)."""
    await server.wait_scanned()
    lifecycle = server.lifecycle
    if name:
        if version:
            records = lifecycle.resolve(name, version)[:1]
        else:
            records = list(lifecycle.catalog.model(name).descending())
    else:
        records = lifecycle.catalog.records()
    found = server.metrics.model_statistics()
    response = pb.ModelStatisticsResponse()
    for record in records:
        stats = found.get((record.name, str(record.version)))
        entry = response.model_stats.add(name=record.name, version=str(record.version))
        loaded = lifecycle.cache.peek(record.key)
        if loaded is not None:
            entry.last_inference = int(loaded.last_used * 1000)
        if stats is None:
            continue
        entry.inference_count = int(stats.successes)
        entry.execution_count = int(stats.executions)
        inference = entry.inference_stats
        inference.success.count = int(stats.successes)
        inference.success.ns = int(stats.success_seconds * 1e9)
        inference.fail.count = int(stats.failures)
        inference.fail.ns = int(stats.failure_seconds * 1e9)
        inference.compute_infer.count = int(stats.executions)
        inference.compute_infer.ns = int(stats.execution_seconds * 1e9)
    return response


def to_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP endpoints write it: field names as in the .proto, enums by
    name, 64-bit integers as JSON numbers (protobuf's own JSON writes them as strings), and
    the statistics' counters present even when zero."""
    found: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.label == FieldDescriptor.LABEL_REPEATED:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                if value:
                    found[field.name] = {
                        k: to_json(v) if isinstance(v, Message) else v for k, v in value.items()
                    }
                continue
            items = [_value(field, item) for item in value]
            if items or field.message_type is not None:
                found[field.name] = items
            continue
        if field.message_type is not None:
            if message.HasField(field.name) or _always(message):
                found[field.name] = to_json(value)
            continue
        if field.containing_oneof is not None and not message.HasField(field.name):
            continue
        found[field.name] = _value(field, value)
    return found


def _always(message: Message) -> bool:
    # Statistics are counters: a zero one is shown, as Triton does.
    return message.DESCRIPTOR.full_name.startswith("inference.") and (
        "Statistic" in message.DESCRIPTOR.name or message.DESCRIPTOR.name == "InferStatistics"
    )


def _value(field: FieldDescriptor, value: Any) -> Any:
    if isinstance(value, Message):
        return to_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


def _type(tensor: protocol.TensorDescription) -> int:
    name = "TYPE_STRING" if tensor.datatype == "BYTES" else f"TYPE_{tensor.datatype}"
    value: int = config_pb.DataType.Value(name)
    return value
