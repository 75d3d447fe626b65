"""What an operator looks at: the dashboard (``GET /``, ``/dashboard``), the status document
it polls (``GET /status``) and a version's input drift (``GET /models/{name}/{version}/monitor``).

All read-only and open like ``/models`` (no admin token): they show what is loaded and how
it behaves, never a secret. The page is one self-contained file shipped in this package, with
no request to anywhere but this server, by relative URLs (so it works behind a path prefix).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multiserve import status
from multiserve.concurrency import run_sync
from multiserve.http.responses import ORJSONResponse
from multiserve.server import ModelServer

PAGE = files("multiserve.http").joinpath("dashboard.html").read_bytes()
# The page runs its own inline script and style, fetches only from this server, and is never
# framed by another site.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}


def _server(request: Request) -> ModelServer:
    server: ModelServer = request.app.state.server
    return server


async def dashboard(request: Request) -> Response:
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=_HEADERS)


async def status_document(request: Request) -> Response:
    return ORJSONResponse(status.build(_server(request)), headers={"Cache-Control": "no-store"})


async def monitor(request: Request) -> Response:
    """A version's input drift, computed afresh (in a worker thread). The version is not
    loaded for this: a version that is not loaded has no statistics."""
    server = _server(request)
    await server.wait_scanned()
    lifecycle = server.lifecycle
    record = lifecycle.resolve(request.path_params["name"], request.path_params["version"])[0]
    state, _ = lifecycle.state(record)
    answer: dict[str, Any] = {
        "name": record.name,
        "version": str(record.version),
        "state": state.value,
        "drift_monitoring": server.monitoring.drift.enabled,
    }
    entry = lifecycle.cache.peek(record.key)
    watch = None if entry is None else entry.watch
    if watch is None or watch.drift is None:
        answer["monitor"] = None
        if not server.monitoring.drift.enabled:
            answer["reason"] = "drift monitoring is off (drift_window = 0)"
        elif entry is None:
            answer["reason"] = "not loaded: statistics start when the version loads"
        else:
            answer["reason"] = "this model's inputs are not monitored (a payload model)"
        return ORJSONResponse(answer)
    report = await run_sync(watch.drift.report)
    answer["monitor"] = report.to_json()
    return ORJSONResponse(answer)


ROUTES = [
    Route("/", dashboard, methods=["GET"]),
    Route("/dashboard", dashboard, methods=["GET"]),
    Route("/status", status_document, methods=["GET"]),
    Route("/models/{name}/{version}/monitor", monitor, methods=["GET"]),
]
