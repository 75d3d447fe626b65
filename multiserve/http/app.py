from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from multiserve.http import admin
from multiserve.http.errors import HANDLERS
from multiserve.http.routes import ROUTES
from multiserve.server import ModelServer


def create_app(server: ModelServer) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = Starlette(
        routes=[*ROUTES, *admin.ROUTES], exception_handlers=dict(HANDLERS), lifespan=lifespan
    )
    app.state.server = server
    return app
