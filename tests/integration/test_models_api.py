"""Listing, metadata, probes, lazy single-flight loads, and an event loop that never blocks."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from multiserve.backends import BackendRegistry
from tests.conftest import StartServer
from tests.helpers import wait_for
from tests.npz_backend import NpzBackend, write_npz_model


def test_healthz_and_readyz(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_ready_means_the_models_backends_are_imported(
    start_server: StartServer, example_models: Path
) -> None:
    server = start_server(example_models)
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 60, "readiness")
    # No model's first request pays for importing its runtime.
    assert server.model_server.registry.imported() == ["onnx", "python", "torch"]


def test_listing_shows_every_model_version_state_and_latest(client: httpx.Client) -> None:
    models = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert set(models) == {"adder", "counter", "iris", "mlp", "regressor", "scaler"}
    # The example predictor runs repository code: refused unless the operator allows it.
    iris = models["iris"]["versions"][0]
    assert (iris["state"], iris["backend"], iris["artifact"]) == (
        "failed",
        "python",
        "predictor.py",
    )
    assert "--allow-python-predictors" in iris["error"]
    assert models["mlp"]["latest"] == "2"
    assert [v["version"] for v in models["mlp"]["versions"]] == ["2", "1"]
    assert {v["state"] for v in models["mlp"]["versions"]} == {"available"}
    assert models["regressor"]["versions"][0]["backend"] == "torch"
    assert models["regressor"]["versions"][0]["artifact"] == "model.pt2"

    client.post("/models/mlp/1/predict", json={"inputs": [[1, 2, 3, 4]]})
    mlp = client.get("/models/mlp").json()
    states = {v["version"]: v["state"] for v in mlp["versions"]}
    assert states == {"2": "available", "1": "ready"}
    loaded = next(v for v in mlp["versions"] if v["version"] == "1")
    assert loaded["memory_bytes"] > 0


def test_version_metadata_gives_tensors_and_memory(client: httpx.Client) -> None:
    meta = client.get("/models/mlp/2").json()
    assert meta["name"] == "mlp"
    assert meta["version"] == "2"
    assert meta["backend"] == "onnx"
    assert meta["state"] == "ready"
    assert meta["memory_bytes"] > 0
    assert meta["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "probabilities", "dtype": "float32", "shape": [-1, 3]}]
    assert client.get("/models/mlp/latest").json()["version"] == "2"


@pytest.mark.torch
def test_torch_metadata(client: httpx.Client) -> None:
    exported = client.get("/models/regressor/1").json()
    assert exported["inputs"] == [{"name": "input", "dtype": "float32", "shape": [-1, 4]}]
    assert exported["outputs"] == [{"name": "output_0", "dtype": "float32", "shape": [-1, 2]}]
    scripted = client.get("/models/scaler/1").json()
    assert scripted["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert scripted["outputs"] == [{"name": "scores", "dtype": "float32", "shape": [-1, 2]}]


def test_models_load_lazily_and_stay_loaded(
    start_server: StartServer, example_models: Path
) -> None:
    server = start_server(example_models)
    lifecycle = server.model_server.lifecycle
    with server.client() as client:
        assert client.get("/models").status_code == 200
        assert lifecycle.loads == 0
        for _ in range(3):
            assert (
                client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]}).status_code
                == 200
            )
        assert lifecycle.loads == 1
        assert lifecycle.cache.hits >= 2


def test_concurrent_first_requests_share_one_load(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.eye(3) * 2)
    (tmp_path / "slow" / "config.toml").write_text("load_delay_s = 0.5\n")
    server = start_server(tmp_path, npz_registry)
    before = NpzBackend.loads

    def predict(i: int) -> httpx.Response:
        with server.client() as client:
            return client.post("/models/slow/predict", json={"inputs": [[i, 0, 1]]})

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(predict, range(50)))
    assert [r.status_code for r in responses] == [200] * 50
    assert [r.json()["outputs"]["y"] for r in responses] == [[[2 * i, 0, 2]] for i in range(50)]
    assert NpzBackend.loads - before == 1
    assert server.model_server.lifecycle.loads == 1


def test_event_loop_answers_while_a_model_loads_and_predicts(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.eye(2))
    (tmp_path / "slow" / "config.toml").write_text("load_delay_s = 1.5\npredict_delay_s = 1.5\n")
    server = start_server(tmp_path, npz_registry)
    with ThreadPoolExecutor(1) as pool, server.client() as client:
        slow = pool.submit(
            lambda: httpx.post(
                f"{server.url}/models/slow/predict", json={"inputs": [[1, 2]]}, timeout=30
            )
        )
        wait_for(
            lambda: client.get("/models/slow").json()["versions"][0]["state"] == "loading",
            10,
            "the slow load to start",
        )
        # A blocked loop would hold these until the load and the prediction finish (3 s).
        # The 1 s bound: /healthz does no work, so even on a busy 2-core machine it answers
        # in milliseconds; only a loop blocked by the 1.5 s load or prediction reaches it.
        for _ in range(5):
            started = time.monotonic()
            assert client.get("/healthz").status_code == 200
            assert time.monotonic() - started < 1.0
            time.sleep(0.2)
        assert client.get("/models/slow").json()["versions"][0]["state"] in ("loading", "ready")
        assert slow.result().status_code == 200


def test_scan_skips_what_is_not_a_model(
    start_server: StartServer, model_repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (model_repo / "bad name!").mkdir()
    (model_repo / "notes.txt").write_text("hello")
    (model_repo / "mlp" / "v3").mkdir()
    (model_repo / "mlp" / "007").mkdir()
    (model_repo / "mlp" / "README").write_text("x")
    (model_repo / "empty" / "1").mkdir(parents=True)
    (model_repo / "mlp" / "4").mkdir()
    (model_repo / "mlp" / "4" / "weights.bin").write_bytes(b"\x00")
    with caplog.at_level("WARNING", logger="multiserve.repository"):
        server = start_server(model_repo)
        with server.client() as client:
            names = {model["name"] for model in client.get("/models").json()["models"]}
            assert "bad name!" not in names
            assert "empty" not in names
            assert client.get("/models/mlp").json()["latest"] == "2"
    skipped = [r.getMessage() for r in caplog.records]
    for fragment in ("bad name!", "notes.txt", "v3", "007", "README", "mlp/4"):
        assert sum(fragment in message for message in skipped) == 1, (fragment, skipped)
    # An empty version directory is a copy that has not started yet: no warning.
    assert not any("empty/1" in message for message in skipped)


def test_two_artifacts_in_one_version_is_a_visible_failure(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "mlp" / "2" / "model.pt").write_bytes(b"x")
    with start_server(model_repo).client() as client:
        version = next(
            v for v in client.get("/models/mlp").json()["versions"] if v["version"] == "2"
        )
        assert version["state"] == "failed"
        assert "more than one model artifact" in version["error"]
        assert (
            client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]}).json()[
                "model_version"
            ]
            == "1"
        )
