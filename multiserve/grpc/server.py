"""The gRPC server: grpcio's asyncio server on the event loop the HTTP server runs on, bound to
``host:grpc_port``, serving `InferenceService`."""

from __future__ import annotations

import logging

from grpc import aio

from multiserve.errors import SettingsError
from multiserve.grpc.service import InferenceService
from multiserve.server import ModelServer

logger = logging.getLogger("multiserve.grpc")


class GrpcServer:
    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.port = 0  # bound by `start`
        self._grpc: aio.Server | None = None

    @property
    def address(self) -> str:
        host = self.server.settings.host
        # An IPv6 address needs brackets before its port.
        return f"[{host}]" if ":" in host and not host.startswith("[") else host

    async def start(self) -> None:
        settings = self.server.settings
        grpc_server = aio.server(
            options=[
                # grpc-core sets SO_REUSEPORT by default, which would let a second server bind
                # the same port and silently take half its calls: a taken port must fail.
                ("grpc.so_reuseport", 0),
                # The same bound on what a request may make the server hold as HTTP's.
                ("grpc.max_receive_message_length", settings.max_request_bytes),
                ("grpc.max_send_message_length", -1),
            ]
        )
        grpc_server.add_generic_rpc_handlers((InferenceService(self.server).handler(),))
        target = f"{self.address}:{settings.grpc_port}"
        try:
            self.port = grpc_server.add_insecure_port(target)
        except RuntimeError:
            raise SettingsError(
                f"grpc_port: cannot listen on {target} (in use?); choose another with "
                "--grpc-port, or 0 to turn gRPC off"
            ) from None
        await grpc_server.start()
        self._grpc = grpc_server
        logger.info("gRPC (Open Inference Protocol) on %s:%d", self.address, self.port)

    async def stop(self, grace: float) -> None:
        """Refuse new calls at once; give running ones ``grace`` seconds, then cancel them."""
        if self._grpc is not None:
            await self._grpc.stop(grace)
            self._grpc = None
