"""Ready means servable: once /readyz says 200, no request gets 503 for a version that was
there at start; a request for a version still settling, or not yet scanned, waits for it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from examples.make_models import scaled_onnx_bytes
from multiserve.backends import BackendRegistry
from multiserve.state import OperatorState
from tests.conftest import RunningServer, StartServer
from tests.helpers import wait_for
from tests.npz_backend import write_npz_model

X = [[1.0, 2.0, 3.0, 4.0]]


def readiness_then_predictions(server: RunningServer, models: list[str]) -> list[int]:
    """Poll /readyz until 200 (noting each answer), then predict every model once: the
    statuses of /readyz before 200 and of the predictions."""
    seen: list[int] = []
    with server.client() as client:

        def ready() -> bool:
            status = client.get("/readyz").status_code
            seen.append(status)
            return status == 200

        wait_for(ready, 20, "/readyz 200")
        predictions = [
            client.post(f"/models/{name}/predict", json={"inputs": X}).status_code
            for name in models
        ]
    return seen + predictions


def test_files_written_just_before_start_are_servable_once_ready(
    start_server: StartServer, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    for name in ("a", "b"):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
    # The default settle window: the files are younger than it when the server starts.
    server = start_server(root, settle_window_s=1.0, settle_wait_s=0)
    statuses = readiness_then_predictions(server, ["a", "b"])
    assert statuses[-2:] == [200, 200], statuses
    assert 503 in statuses[:-3], "the server said ready before its versions had settled"


def test_readyz_gives_the_reason_while_versions_settle(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(1.0))
    server = start_server(tmp_path, settle_window_s=60, startup_timeout_s=60)
    with server.client() as client:
        wait_for(lambda: server.model_server.scanned, 10, "the first scan")
        wait_for(lambda: "settling" in str(client.get("/readyz").json()), 10, "the reason")
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.json() == {
            "status": "not_ready",
            "reason": "waiting for the repository's versions: settling: m version 1",
        }
        assert client.get("/v2/health/ready").status_code == 503


def test_startup_timeout_bounds_the_wait(start_server: StartServer, tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(1.0))
    server = start_server(tmp_path, settle_window_s=60, startup_timeout_s=0.3)
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready after the timeout")
        assert client.get("/v2/health/ready").status_code == 200


def test_dropped_version_is_served_by_a_request_sent_before_any_scan_saw_it(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(1.0))
    # No watch and no periodic rescan: only the request itself can make the server look.
    server = start_server(
        tmp_path, watch=False, rescan_interval_s=0, settle_window_s=0.5, settle_wait_s=5
    )
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
        (tmp_path / "fresh" / "1").mkdir(parents=True)
        (tmp_path / "fresh" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(3.0))
        started = time.monotonic()
        response = client.post("/models/fresh/predict", json={"inputs": X})
        assert response.status_code == 200, response.text
        assert response.json()["outputs"]["y"] == [[3.0, 6.0, 9.0, 12.0]]
        # It waited for the settle window, not for the whole settle_wait_s.
        assert time.monotonic() - started < 4
        # A name the repository does not hold is still 404 at once.
        missing = client.post("/models/nothing-here/predict", json={"inputs": X})
        assert missing.status_code == 404


def test_request_for_a_settling_version_waits_then_answers(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(1.0))
    server = start_server(tmp_path, settle_window_s=0.6, settle_wait_s=5)
    results: list[httpx.Response] = []
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
        (tmp_path / "m" / "2").mkdir()
        (tmp_path / "m" / "2" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
        wait_for(lambda: '"2"' in client.get("/models/m").text, 5, "version 2 to be listed")
        asking = threading.Thread(
            target=lambda: results.append(client.post("/models/m/2/predict", json={"inputs": X}))
        )
        asking.start()
        asking.join(timeout=15)
    assert results[0].status_code == 200, results[0].text
    assert results[0].json()["outputs"]["y"] == [[2.0, 4.0, 6.0, 8.0]]


def test_pinned_versions_load_before_the_server_says_ready(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.eye(2))
    (tmp_path / "slow" / "config.toml").write_text("load_delay_s = 1.0\n")
    (tmp_path / ".multiserve").mkdir()
    (tmp_path / ".multiserve" / "state.json").write_text(
        json.dumps(OperatorState().with_pin(("slow", 1), True).to_json())
    )
    server = start_server(tmp_path, npz_registry)
    with server.client() as client:
        wait_for(lambda: "loading pinned" in client.get("/readyz").text, 10, "the pinned load")
        assert client.get("/readyz").json() == {
            "status": "not_ready",
            "reason": "waiting for the repository's versions: loading pinned: slow version 1",
        }
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
        assert ("slow", 1) in server.model_server.lifecycle.cache
