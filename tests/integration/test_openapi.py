"""The OpenAPI document describes the server: schemathesis generates requests from it against a
live server and checks every answer (no 5xx, status documented, body matching its schema)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis import checks

from multiserve.http.openapi import build
from tests.conftest import ADMIN_TOKEN, RunningServer

schema = schemathesis.openapi.from_dict(build())


@schemathesis.serializer("application/x-npy")
def _npy(ctx: object, value: object) -> bytes:
    # The document says "binary": any bytes, which the server must refuse cleanly unless they
    # happen to be an .npy file.
    return value if isinstance(value, bytes) else str(value).encode()


def test_document_is_valid_openapi_and_served(client: httpx.Client) -> None:
    validate(build())
    assert client.get("/openapi.json").json() == build()


def test_every_route_is_documented(client: httpx.Client) -> None:
    from starlette.routing import Route

    from multiserve.http import admin, monitoring, routes, v2

    documented = build()["paths"]
    for route in [*routes.ROUTES, *admin.ROUTES, *v2.ROUTES, *monitoring.ROUTES]:
        assert isinstance(route, Route)
        assert route.path in documented, route.path
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        assert methods <= set(documented[route.path]), route.path


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> object:
    # One server for every generated case; module-scoped, so started by hand.
    from examples.make_models import write_examples
    from multiserve.backends import BackendRegistry
    from multiserve.settings import Settings

    root = tmp_path_factory.mktemp("openapi-models")
    write_examples(root)
    loaded = Settings.load(
        environ={},
        overrides={"models": str(root), "settle_window_s": 0, "admin_token": ADMIN_TOKEN},
    )
    server = RunningServer(loaded, BackendRegistry()).start()
    yield server
    server.stop()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document(
    case: schemathesis.Case[Any], live_server: RunningServer
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    response = case.call(base_url=live_server.url, headers=headers, timeout=30)
    # What the issue asks of every answer: no 5xx, a documented status and content type, and a
    # body that matches its schema. (Whether a schema-valid tensor fits a given model's shapes
    # is the model's business, which the document cannot state.)
    case.validate_response(
        response,
        checks=[
            checks.not_a_server_error,
            checks.status_code_conformance,
            checks.content_type_conformance,
            checks.response_schema_conformance,
        ],
    )
