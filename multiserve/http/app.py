from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware

from multiserve.grpc import GrpcServer
from multiserve.http import admin, monitoring, v2
from multiserve.http.errors import HANDLERS
from multiserve.http.predict import PredictRoutes
from multiserve.http.routes import ROUTES
from multiserve.metrics import MetricsMiddleware
from multiserve.server import ModelServer


def create_app(server: ModelServer) -> PredictRoutes:
    """The ASGI app: predictions answered in front (`PredictRoutes`), the rest by starlette."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await server.start()
        # The gRPC face lives as long as the app: the CLI and an embedding server alike get it.
        grpc_server = GrpcServer(server) if server.settings.grpc_port else None
        app.state.grpc_server = grpc_server
        try:
            if grpc_server is not None:
                await grpc_server.start()
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(server.settings.shutdown_timeout_s)
            await server.stop()

    app = Starlette(
        routes=[*ROUTES, *admin.ROUTES, *v2.ROUTES, *monitoring.ROUTES],
        exception_handlers=dict(HANDLERS),
        middleware=[Middleware(MetricsMiddleware, metrics=server.metrics)],
        lifespan=lifespan,
    )
    app.state.server = server
    return PredictRoutes(app, server)
