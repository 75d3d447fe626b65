"""Native routes: /models, /models/{name}[/{version}][/predict], /healthz, /readyz."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multiserve import codecs
from multiserve.catalog import ModelRecord
from multiserve.errors import MethodNotAllowed
from multiserve.http import openapi, predict
from multiserve.http.responses import ORJSONResponse
from multiserve.lifecycle import Lifecycle
from multiserve.metrics import CONTENT_TYPE
from multiserve.server import ModelServer

logger = logging.getLogger("multiserve.http")
_OPENAPI = codecs.dumps(openapi.build())


def _server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.server
    return server


async def metrics(request: Request) -> Response:
    server = _server(request)
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)


async def openapi_document(request: Request) -> Response:
    return Response(_OPENAPI, media_type=codecs.JSON)


async def healthz(request: Request) -> Response:
    return ORJSONResponse({"status": "alive"})


async def readyz(request: Request) -> Response:
    server = _server(request)
    if not server.ready:
        return ORJSONResponse({"status": "not_ready", "reason": server.not_ready_reason}, 503)
    if server.degraded_reason is not None:
        # Still 200: the loaded models serve, and taking this replica out of rotation would
        # turn a repository outage into a serving outage.
        return ORJSONResponse({"status": "degraded", "reason": server.degraded_reason})
    return ORJSONResponse({"status": "ready"})


async def list_models(request: Request) -> Response:
    server = _server(request)
    await server.wait_scanned()
    lifecycle = server.lifecycle
    models = [_describe_model(lifecycle, model) for model in lifecycle.catalog.models.values()]
    repository: dict[str, Any] = {
        "source": str(server.repository.root),
        "status": "degraded" if server.degraded_reason else "ok",
    }
    if server.degraded_reason:
        repository["reason"] = server.degraded_reason
    return ORJSONResponse({"repository": repository, "models": models})


async def get_model(request: Request) -> Response:
    server = _server(request)
    await server.wait_scanned()
    lifecycle = server.lifecycle
    return ORJSONResponse(
        _describe_model(lifecycle, lifecycle.catalog.model(request.path_params["name"]))
    )


async def get_version(request: Request) -> Response:
    """A version's metadata. Inputs and outputs are known once loaded, so this loads it."""
    selector = request.path_params["version"]
    if selector == "predict":
        raise MethodNotAllowed("predict takes POST")
    server = _server(request)
    await server.wait_scanned()
    async with server.lifecycle.lease(request.path_params["name"], selector) as lease:
        return ORJSONResponse(server.lifecycle.describe(lease.record))


def _describe_model(lifecycle: Lifecycle, model: ModelRecord) -> dict[str, Any]:
    latest = lifecycle.latest(model.name)
    return {
        "name": model.name,
        "latest": str(latest.version) if latest is not None else None,
        "labels": {k: str(v) for k, v in sorted(lifecycle.labels.get(model.name, {}).items())},
        "versions": [lifecycle.describe(record) for record in model.descending()],
    }


# Predictions are answered in front of the router (`predict.PredictRoutes`); these two routes
# document them and answer other methods with 405.
ROUTES = [
    Route(predict.ROUTE, predict.endpoint, methods=["POST"]),
    Route(predict.LATEST_ROUTE, predict.endpoint, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/models/{name}", get_model, methods=["GET"]),
    Route("/models/{name}/{version}", get_version, methods=["GET"]),
]
