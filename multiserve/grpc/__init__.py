"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), so Triton's and
KServe's gRPC clients work unchanged: a thin face over `ModelServer`, beside `multiserve.http`.

The messages and the service's method names come from ``tritonclient.grpc``'s generated
``service_pb2`` and ``model_config_pb2``, not from our own ``protoc`` run. Protobuf keeps one
definition of each message name per process, and rejects a second, different one ("duplicate
symbol 'inference.ServerLiveRequest'"): a copy generated here would break every process that
also imports tritonclient's gRPC client, this project's tests included. Using its modules, the
server and Triton's client share one definition, so they agree on the wire by construction.
"""

from multiserve.grpc.server import GrpcServer

__all__ = ["GrpcServer"]
