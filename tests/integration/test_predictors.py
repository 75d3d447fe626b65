"""Python predictors (the ``python`` backend) on a real server: the contract, the opt-in, and
errors that stay with their request."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import StartServer
from tests.helpers import error_of

ECHO = """
import numpy as np
from multiserve_python import Response

class Predictor:
    def __init__(self, config, model_dir):
        self.greeting = config.get("greeting", "hello")
        self.files = sorted(p.name for p in model_dir.iterdir())

    def predict(self, payload, query_params, headers):
        if isinstance(payload, bytes):
            return {"size": len(payload), "content_type": headers.get("content-type")}
        if payload == "raw":
            return b"\\x00\\x01raw"
        if payload == "numpy":
            return {"array": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.int64(7)}
        if payload == "response":
            return Response({"made": True}, status=201, headers={"X-Custom": "yes"})
        if payload == "png":
            return Response(b"\\x89PNG", media_type="image/png")
        if payload == "bad header":
            return Response({}, headers={"Content-Length": "1"})
        if payload == "fail":
            raise ValueError("this payload is refused")
        return {
            "greeting": self.greeting,
            "payload": payload,
            "query": dict(query_params),
            "agent": headers.get("x-agent"),
            "files": self.files,
        }
"""


def write_predictor(
    root: Path,
    name: str,
    version: int,
    source: str,
    config: str = "",
    files: dict[str, str] | None = None,
) -> Path:
    version_dir = root / name / str(version)
    version_dir.mkdir(parents=True)
    for filename, text in (files or {}).items():
        (version_dir / filename).write_text(text)
    if config:
        (version_dir / "config.toml").write_text(textwrap.dedent(config))
    # Written last: a scan that sees predictor.py sees its sibling files.
    (version_dir / "predictor.py").write_text(textwrap.dedent(source))
    return version_dir


@pytest.fixture
def echo_client(start_server: StartServer, tmp_path: Path) -> Iterator[httpx.Client]:
    write_predictor(tmp_path, "echo", 1, ECHO, 'greeting = "bonjour"\n')
    with start_server(tmp_path, allow_python_predictors=True).client() as client:
        yield client


def test_json_payload_query_params_and_headers_reach_predict(echo_client: httpx.Client) -> None:
    response = echo_client.post(
        "/models/echo/predict?lang=fr&lang=de&empty=",
        json={"text": "salut", "n": [1, 2]},
        headers={"X-Agent": "tests"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-model-name"] == "echo"
    assert response.headers["x-model-version"] == "1"
    assert response.json() == {
        "greeting": "bonjour",  # config.toml, as `config`
        "payload": {"text": "salut", "n": [1, 2]},
        "query": {"lang": "de", "empty": ""},
        "agent": "tests",
        "files": ["config.toml", "predictor.py"],  # model_dir
    }


def test_any_other_content_type_is_passed_as_raw_bytes(echo_client: httpx.Client) -> None:
    image = bytes(range(256)) * 4
    response = echo_client.post(
        "/models/echo/1/predict", content=image, headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"size": 1024, "content_type": "image/png"}
    # curl -d's default type, and .npy, are raw bytes to a predictor too
    for content_type in ("application/x-www-form-urlencoded", "application/x-npy"):
        raw = echo_client.post(
            "/models/echo/predict", content=b"a=1", headers={"Content-Type": content_type}
        )
        assert raw.json() == {"size": 3, "content_type": content_type}


def test_return_values_bytes_numpy_and_response_objects(echo_client: httpx.Client) -> None:
    raw = echo_client.post("/models/echo/predict", json="raw")
    assert raw.status_code == 200
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.content == b"\x00\x01raw"

    numpy = echo_client.post("/models/echo/predict", json="numpy")
    assert numpy.json() == {"array": [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], "scalar": 7}

    made = echo_client.post("/models/echo/predict", json="response")
    assert made.status_code == 201
    assert made.headers["x-custom"] == "yes"
    assert made.headers["x-model-name"] == "echo"
    assert made.json() == {"made": True}

    png = echo_client.post("/models/echo/predict", json="png")
    assert png.headers["content-type"] == "image/png"
    assert png.content == b"\x89PNG"

    # A reply the server cannot send as it is: a clear 500, and the predictor keeps serving.
    bad = echo_client.post("/models/echo/predict", json="bad header")
    assert "Content-Length" in error_of(bad, 500)["message"]
    assert echo_client.post("/models/echo/predict", json="raw").status_code == 200


def test_an_exception_in_predict_fails_only_its_request(echo_client: httpx.Client) -> None:
    error = error_of(echo_client.post("/models/echo/predict", json="fail"), 500)
    assert error["code"] == "prediction_failed"
    assert "echo version 1" in error["message"]
    assert "ValueError: this payload is refused" in error["message"]
    malformed = echo_client.post(
        "/models/echo/predict", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert error_of(malformed, 400)["code"] == "malformed_request"
    assert echo_client.post("/models/echo/predict", json="raw").status_code == 200
    state = echo_client.get("/models/echo/1").json()
    assert state["state"] == "ready"
    assert state["predictor"] == {"class": "Predictor", "isolation": "none"}


def test_tensor_routes_say_where_a_predictors_payload_goes(echo_client: httpx.Client) -> None:
    v2 = echo_client.post("/v2/models/echo/infer", json={"inputs": []})
    assert v2.status_code == 400
    assert "/models/echo/1/predict" in v2.json()["error"]
    assert echo_client.get("/v2/models/echo/ready").status_code == 200


def test_predictors_are_refused_unless_allowed_and_nothing_of_them_runs(
    start_server: StartServer, tmp_path: Path
) -> None:
    marker = tmp_path / "executed"
    source = f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("the module body ran")

        class Predictor:
            def predict(self, payload):
                return "ran"
    """
    root = tmp_path / "models"
    write_predictor(root, "sneaky", 1, source)
    # A Cortex predictor named by config.toml is refused just the same.
    write_predictor(root, "named", 1, source, 'backend = "python"\n')
    with start_server(root).client() as client:
        listed = {m["name"]: m["versions"][0] for m in client.get("/models").json()["models"]}
        for name in ("sneaky", "named"):
            assert listed[name]["state"] == "failed"
            assert "--allow-python-predictors" in listed[name]["error"]
            refused = error_of(client.post(f"/models/{name}/predict", json={}), 503)
            assert "--allow-python-predictors" in refused["message"]
            admin = client.post(
                f"/admin/models/{name}/1/load", headers={"Authorization": "Bearer test-admin-token"}
            )
            assert admin.status_code == 503
    assert not marker.exists()
    # The same repository with predictors allowed: the module does run (the check above can
    # tell).
    with start_server(root, allow_python_predictors=True).client() as client:
        assert client.post("/models/sneaky/predict", json={}).json() == "ran"
    assert marker.read_text() == "the module body ran"


def test_load_failures_say_why(start_server: StartServer, tmp_path: Path) -> None:
    write_predictor(
        tmp_path,
        "broken-init",
        1,
        """
        class Predictor:
            def __init__(self, config):
                raise KeyError("weights_path")

            def predict(self, payload):
                return payload
        """,
    )
    write_predictor(
        tmp_path,
        "missing-import",
        1,
        """
        import no_such_package_for_multiserve

        class Predictor:
            def predict(self, payload):
                return payload
        """,
    )
    write_predictor(
        tmp_path,
        "asks-too-much",
        1,
        """
        class Predictor:
            def __init__(self, config, python_client):
                pass

            def predict(self, payload):
                return payload
        """,
    )
    write_predictor(tmp_path, "no-class", 1, "VALUE = 1\n")
    server = start_server(tmp_path, allow_python_predictors=True)
    expected = {
        "broken-init": "Predictor.__init__ raised KeyError: 'weights_path'",
        "missing-import": "'no_such_package_for_multiserve', which is not installed",
        "asks-too-much": "takes 'python_client', which multiserve does not provide",
        "no-class": "defines no class 'Predictor'",
    }
    with server.client() as client:
        for name, message in expected.items():
            error = error_of(client.post(f"/models/{name}/predict", json={}), 503)
            assert message in error["message"], error["message"]
            version = client.get(f"/models/{name}").json()["versions"][0]
            assert version["state"] == "failed"
            assert message in version["error"]


def test_a_failing_warm_up_fails_the_load_and_the_previous_version_keeps_serving(
    start_server: StartServer, tmp_path: Path
) -> None:
    source = """
        class Predictor:
            def __init__(self, model_dir):
                self.version = int(model_dir.name)

            def predict(self, payload):
                if payload.get("strict") and self.version == 2:
                    raise RuntimeError("version 2 rejects its warm-up")
                return {"version": self.version}
    """
    warmup = {"warmup.json": '{"strict": true}'}
    write_predictor(tmp_path, "guarded", 1, source, files=warmup)
    server = start_server(tmp_path, allow_python_predictors=True)
    with server.client() as client:
        assert client.post("/models/guarded/predict", json={}).json() == {"version": 1}
        write_predictor(tmp_path, "guarded", 2, source, files=warmup)

        def version_2_state() -> str | None:
            versions = client.get("/models/guarded").json()["versions"]
            return next((v["state"] for v in versions if v["version"] == "2"), None)

        from tests.helpers import wait_for

        wait_for(lambda: version_2_state() == "failed", 15, "version 2 to fail its warm-up")
        version = client.get("/models/guarded").json()["versions"][0]
        assert "failed its warm-up" in version["error"]
        assert "version 2 rejects its warm-up" in version["error"]
        assert client.post("/models/guarded/predict", json={}).json() == {"version": 1}


def test_a_tensor_model_refuses_other_content_types_without_loading(
    start_server: StartServer, model_repo: Path
) -> None:
    write_predictor(model_repo, "echo", 1, ECHO)
    with start_server(model_repo, allow_python_predictors=True).client() as client:
        refused = client.post(
            "/models/mlp/predict", content=b"a=1", headers={"Content-Type": "text/csv"}
        )
        assert error_of(refused, 415)["code"] == "unsupported_media_type"
        assert {v["state"] for v in client.get("/models/mlp").json()["versions"]} == {"available"}
        # ... while a cold predictor takes the same request.
        taken = client.post(
            "/models/echo/predict", content=b"a=1", headers={"Content-Type": "text/csv"}
        )
        assert taken.json() == {"size": 3, "content_type": "text/csv"}
