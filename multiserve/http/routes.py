"""Native routes: /models, /models/{name}[/{version}][/predict], /healthz, /readyz."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multiserve import codecs
from multiserve.catalog import LATEST, ModelRecord
from multiserve.concurrency import run_sync
from multiserve.errors import (
    MethodNotAllowed,
    UnsupportedMediaType,
)
from multiserve.http import openapi
from multiserve.http.body import check_length, read_body
from multiserve.http.responses import ORJSONResponse
from multiserve.lifecycle import Lease, Lifecycle
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


async def predict(request: Request) -> Response:
    server = _server(request)
    limit = server.settings.max_request_bytes
    body_kind = _body_kind(request.headers.get("content-type", ""))
    check_length(request, limit)
    wants_npy = codecs.NPY in request.headers.get("accept", "")
    # Only an .npy answer picks an output; parsing the query string costs on every request.
    output = request.query_params.get("output") if wants_npy else None
    name = request.path_params["name"]
    await server.wait_scanned()
    async with server.lifecycle.lease(name, request.path_params.get("version", LATEST)) as lease:
        body = await read_body(request, limit)
        content = await run_sync(_predict_blocking, lease, body, body_kind, wants_npy, output)
    return Response(
        content,
        media_type=codecs.NPY if wants_npy else codecs.JSON,
        headers={"X-Model-Name": name, "X-Model-Version": str(lease.record.version)},
    )


def _predict_blocking(
    lease: Lease, body: bytes, body_kind: str, wants_npy: bool, output: str | None
) -> bytes:
    decode = codecs.decode_npy if body_kind == codecs.NPY else codecs.decode_json
    outputs = lease.predict(decode(body, lease.model.metadata))
    if wants_npy:
        return codecs.encode_npy(outputs, output)
    return codecs.encode_json(lease.record.name, lease.record.version, outputs)


def _body_kind(content_type: str) -> str:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in ("", codecs.JSON):
        return codecs.JSON
    if media_type == codecs.NPY:
        return codecs.NPY
    hint = ""
    if media_type == "application/x-www-form-urlencoded":
        hint = f" (curl -d sends this type: add -H 'Content-Type: {codecs.JSON}')"
    raise UnsupportedMediaType(
        f"content type {media_type!r} is not supported; send {codecs.JSON} or {codecs.NPY}{hint}"
    )


def _describe_model(lifecycle: Lifecycle, model: ModelRecord) -> dict[str, Any]:
    latest = lifecycle.latest(model.name)
    return {
        "name": model.name,
        "latest": str(latest.version) if latest is not None else None,
        "labels": {k: str(v) for k, v in sorted(lifecycle.labels.get(model.name, {}).items())},
        "versions": [lifecycle.describe(record) for record in model.descending()],
    }


# The prediction routes first: routing tries each route in turn, and predictions are the hot
# path.
ROUTES = [
    Route("/models/{name}/{version}/predict", predict, methods=["POST"]),
    Route("/models/{name}/predict", predict, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi_document, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/models", list_models, methods=["GET"]),
    Route("/models/{name}", get_model, methods=["GET"]),
    Route("/models/{name}/{version}", get_version, methods=["GET"]),
]
