"""``inference.GRPCInferenceService``: the Open Inference Protocol's RPCs and Triton's model
repository, configuration and statistics extensions, answered from the same `ModelServer` the
HTTP face uses. The shared-memory, trace and log-settings RPCs are not served (UNIMPLEMENTED).

``ModelInfer`` and ``ModelStreamInfer`` take and give serialized bytes: a request is parsed on
the event loop only when small, and every answer is encoded in the model's worker thread, so
large tensors never hold up the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio
from tritonclient.grpc import service_pb2 as pb

from multiserve import __version__, extensions, protocol
from multiserve.auth import require_admin
from multiserve.catalog import LATEST, VersionRecord
from multiserve.concurrency import run_sync
from multiserve.errors import InvalidInput, MalformedRequest, MultiserveError
from multiserve.grpc import infer
from multiserve.grpc.status import INTERNAL_MESSAGE, abort, code_of, logger
from multiserve.lifecycle import LoadedEntry
from multiserve.server import ModelServer

SERVICE = "inference.GRPCInferenceService"
EXTENSIONS = ("model_repository", "model_configuration", "statistics")
# Requests up to this size are parsed on the event loop (microseconds); larger ones in a worker.
PARSE_ON_LOOP_BYTES = 256 * 1024
# Requests of one stream that may run at once; past it the stream is read no further until one
# finishes, and HTTP/2 flow control holds the client back.
STREAM_IN_FLIGHT = 64

Context = aio.ServicerContext[Any, Any]


class InferenceService:
    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        unary = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest),
            "RepositoryModelLoad": (self.repository_model_load, pb.RepositoryModelLoadRequest),
            "RepositoryModelUnload": (
                self.repository_model_unload,
                pb.RepositoryModelUnloadRequest,
            ),
        }
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            method: grpc.unary_unary_rpc_method_handler(
                self._observed(method, call),
                request_deserializer=message.FromString,
                response_serializer=_serialize,
            )
            for method, (call, message) in unary.items()
        }
        # Bytes in, bytes out: parsed and encoded off the loop (module docstring).
        handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(self.model_infer)
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.model_stream_infer
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _observed(
        self, method: str, call: Callable[[Any, Context], Awaitable[Any]]
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        """``call`` with its errors as gRPC statuses, counted and timed in the metrics."""
        metrics = self.server.metrics

        async def handle(request: Any, context: Context) -> Any:
            code, status = "OK", 200
            metrics.rpcs_in_flight += 1
            started = time.perf_counter()
            try:
                return await call(request, context)
            except asyncio.CancelledError:
                code, status = "CANCELLED", 499
                raise
            except Exception as exc:
                code, status = _outcome(exc)
                await abort(context, exc)
            finally:
                metrics.rpcs_in_flight -= 1
                elapsed = time.perf_counter() - started
                metrics.observe_rpc(method, code, status, elapsed, "", "")

        return handle

    # --- health and metadata ----------------------------------------------------------------

    async def server_live(self, request: Any, context: Context) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: Any, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def model_ready(self, request: Any, context: Context) -> Any:
        """As Triton answers it: ``ready: false``, not an error, for a model that is unknown,
        still settling or failing to load."""
        try:
            reason = await protocol.not_ready_reason(
                self.server, request.name, request.version or LATEST
            )
        except MultiserveError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=reason is None)

    async def server_metadata(self, request: Any, context: Context) -> Any:
        return pb.ServerMetadataResponse(
            name=protocol.SERVER_NAME, version=__version__, extensions=EXTENSIONS
        )

    async def model_metadata(self, request: Any, context: Context) -> Any:
        described = await protocol.describe_model(
            self.server, request.name, request.version or LATEST
        )
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=described.name,
            versions=described.versions,
            platform=described.platform,
            inputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in described.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in described.outputs
            ],
        )

    async def model_config(self, request: Any, context: Context) -> Any:
        config = await extensions.model_config(self.server, request.name, request.version)
        return pb.ModelConfigResponse(config=config)

    async def model_statistics(self, request: Any, context: Context) -> Any:
        return await extensions.model_statistics(self.server, request.name, request.version)

    # --- the model repository extension (admin token required) -----------------------------

    def _authorize(self, context: Context) -> None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
        require_admin(authorization, self.server.admin_token)

    async def repository_index(self, request: Any, context: Context) -> Any:
        self._authorize(context)
        index = await protocol.repository_index(self.server, request.ready)
        model = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                model(name=e.name, version=e.version, state=e.state, reason=e.reason) for e in index
            ]
        )

    async def repository_model_load(self, request: Any, context: Context) -> Any:
        self._authorize(context)
        if request.parameters:
            # Triton's config overrides and uploaded files: refused rather than ignored.
            raise InvalidInput(
                "load parameters are not supported: " + ", ".join(sorted(request.parameters))
            )
        await protocol.load_model(self.server, request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any, context: Context) -> Any:
        self._authorize(context)
        await protocol.unload_model(self.server, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference --------------------------------------------------------------------------

    async def model_infer(self, data: bytes, context: Context) -> bytes:
        try:
            # The client's deadline (grpc-timeout) bounds its wait in the model's queue too.
            deadline = self.server.admission.deadline_after(context.time_remaining())
            return await self._infer(data, "ModelInfer", stream=False, deadline=deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await abort(context, exc)

    async def model_stream_infer(self, requests: AsyncIterator[bytes], context: Context) -> None:
        """Each request of the stream runs as it arrives (up to `STREAM_IN_FLIGHT` at once);
        answers are written as they finish, so in any order: the protocol's ``id`` pairs
        them. A failed request is answered with its ``error_message`` and the stream goes
        on, as Triton does."""
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        write = asyncio.Lock()
        running: set[asyncio.Task[None]] = set()

        async def answer(data: bytes) -> None:
            try:
                try:
                    message = await self._infer(data, "ModelStreamInfer", stream=True)
                except MultiserveError as exc:
                    message = _stream_error(data, exc.message)
                except Exception as exc:
                    logger.error("unhandled error in a gRPC stream", exc_info=exc)
                    message = _stream_error(data, INTERNAL_MESSAGE)
                async with write:
                    await context.write(message)
            finally:
                room.release()

        try:
            async for data in requests:
                await room.acquire()
                task = asyncio.create_task(answer(data))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()

    async def _infer(
        self, data: bytes, method: str, *, stream: bool, deadline: float | None = None
    ) -> bytes:
        """One inference request, counted and timed; its serialized answer. A cancelled call
        cancels its job's future, so a job not started yet is never run; past ``deadline`` a
        queued job is dropped (`multiserve.admission`)."""
        server = self.server
        metrics = server.metrics
        metrics.rpcs_in_flight += 1
        started = time.perf_counter()
        code, status, name = "OK", 200, ""
        resolved: VersionRecord | None = None

        def on_resolved(entry: LoadedEntry) -> None:
            nonlocal resolved
            resolved = entry.record

        try:
            request = await _parse(data)
            name = request.model_name
            selector = request.model_version or LATEST
            if not server.scanned:
                await server.wait_scanned()
            job = infer.prepare(request, on_resolved, stream=stream)
            lifecycle = server.lifecycle
            admission = server.admission

            def wait(record: VersionRecord, future: asyncio.Future[bytes]) -> Awaitable[bytes]:
                return admission.wait(record, future, deadline, None)

            submitted = lifecycle.submit(name, selector, job)
            if submitted is None:
                _, answer = await lifecycle.infer(name, selector, job, wait)
            elif deadline is None:
                answer = await submitted[1]
            else:
                answer = await wait(*submitted)
            return answer
        except asyncio.CancelledError:
            code, status = "CANCELLED", 499
            raise
        except Exception as exc:
            code, status = _outcome(exc)
            raise
        finally:
            metrics.rpcs_in_flight -= 1
            version = "" if resolved is None else str(resolved.version)
            elapsed = time.perf_counter() - started
            metrics.observe_rpc(method, code, status, elapsed, name, version)


async def _parse(data: bytes) -> Any:
    try:
        if len(data) <= PARSE_ON_LOOP_BYTES:
            return pb.ModelInferRequest.FromString(data)
        return await run_sync(pb.ModelInferRequest.FromString, data)
    except DecodeError as exc:
        raise MalformedRequest(f"the request is not a ModelInferRequest: {exc}") from None


def _stream_error(data: bytes, message: str) -> bytes:
    answer = pb.ModelStreamInferResponse(error_message=message)
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        pass
    else:
        answer.infer_response.id = request.id
        answer.infer_response.model_name = request.model_name
        answer.infer_response.model_version = request.model_version
    serialized: bytes = answer.SerializeToString()
    return serialized


def _outcome(exc: BaseException) -> tuple[str, int]:
    """The gRPC code name and the HTTP status of an error, for the metrics."""
    if isinstance(exc, MultiserveError):
        return code_of(exc).name, exc.status_code
    return grpc.StatusCode.INTERNAL.name, 500


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _tensor_metadata(tensor: protocol.TensorDescription) -> Any:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=tensor.name, datatype=tensor.datatype, shape=tensor.shape
    )
