"""The admin API: pin, unpin, evict, load, labels, cache inspection. Every route needs
``Authorization: Bearer <admin token>``."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multiserve.admission import ADMIN_BODY_BYTES
from multiserve.auth import require_admin
from multiserve.errors import MalformedRequest
from multiserve.http.body import check_length, read_body
from multiserve.http.responses import ORJSONResponse
from multiserve.server import ModelServer


def authorized(request: Request) -> ModelServer:
    """The server, once the request proved it holds the admin token."""
    server: ModelServer = request.app.state.server
    require_admin(request.headers.get("authorization"), server.admin_token)
    return server


def _version(request: Request) -> tuple[str, str]:
    return request.path_params["name"], request.path_params["version"]


async def cache(request: Request) -> Response:
    server = authorized(request)
    lifecycle = server.lifecycle
    store = lifecycle.cache
    entries = [
        {
            "name": key[0],
            "version": str(key[1]),
            "memory_bytes": entry.memory_bytes,
            "pinned": store.is_pinned(key),
            "last_used": entry.last_used,
            "loaded_at": entry.loaded_at,
            "in_flight": entry.in_flight,
            # lru, or tinylfu's window / main; and the frequency sketch's estimate (tinylfu)
            "segment": store.segment(key),
            "frequency": store.frequency(key),
            **({"memory": entry.memory.to_json()} if entry.memory is not None else {}),
        }
        for key, entry in store.items()
    ]
    return ORJSONResponse(
        {
            "entries": entries,
            "totals": {"models": len(store), "memory_bytes": store.total_bytes},
            "budget": {
                "max_models": store.max_items,
                "max_memory_bytes": store.max_bytes,
                "policy": store.policy,
            },
            "pins": [{"name": n, "version": str(v)} for n, v in sorted(store.pins)],
            "stats": {
                "hits": store.hits,
                "misses": store.misses,
                "loads": lifecycle.loads,
                "load_failures": lifecycle.load_failures,
                "evictions": lifecycle.evictions,
                "swaps": lifecycle.swaps,
                "closing": lifecycle.closing,
            },
        }
    )


async def load(request: Request) -> Response:
    server = authorized(request)
    entry = await server.load(*_version(request))
    return ORJSONResponse(server.lifecycle.describe(entry.record))


async def evict(request: Request) -> Response:
    server = authorized(request)
    record = await server.evict(*_version(request))
    return ORJSONResponse(server.lifecycle.describe(record))


async def pin(request: Request) -> Response:
    server = authorized(request)
    if request.method == "DELETE":
        record = await server.unpin(*_version(request))
    else:
        record = (await server.pin(*_version(request))).record
    return ORJSONResponse(server.lifecycle.describe(record))


async def label(request: Request) -> Response:
    server = authorized(request)
    name, label = request.path_params["name"], request.path_params["label"]
    if request.method == "DELETE":
        await server.delete_label(name, label)
    else:
        check_length(request, ADMIN_BODY_BYTES)
        body = await read_body(request, ADMIN_BODY_BYTES)
        await server.set_label(name, label, _requested_version(body))
    labels = server.lifecycle.labels.get(name, {})
    return ORJSONResponse({"name": name, "labels": {k: str(v) for k, v in sorted(labels.items())}})


def _requested_version(body: bytes) -> str:
    try:
        payload: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
    version = payload.get("version") if isinstance(payload, dict) else None
    if isinstance(version, bool) or not isinstance(version, str | int):
        raise MalformedRequest('expected a JSON object {"version": "<version number>"}')
    return str(version)


ROUTES = [
    Route("/admin/cache", cache, methods=["GET"]),
    Route("/admin/models/{name}/labels/{label}", label, methods=["PUT", "DELETE"]),
    Route("/admin/models/{name}/{version}/load", load, methods=["POST"]),
    Route("/admin/models/{name}/{version}/evict", evict, methods=["POST"]),
    Route("/admin/models/{name}/{version}/pin", pin, methods=["POST", "DELETE"]),
]
