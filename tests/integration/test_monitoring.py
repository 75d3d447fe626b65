"""Drift monitoring, payload samples, /status, and Triton's configuration and statistics over
HTTP, on a real server."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from examples.make_models import write_mlp_onnx
from tests.conftest import RunningServer, StartServer
from tests.helpers import wait_for

FEATURES = 4


def _mlp_repo(root: Path, reference: np.ndarray | None = None) -> Path:
    write_mlp_onnx(root / "mlp" / "1" / "model.onnx", seed=1)
    if reference is not None:
        np.savez(root / "mlp" / "1" / "reference.npz", x=reference)
    return root


def _send(client: httpx.Client, rows: np.ndarray, per_request: int = 25) -> None:
    for start in range(0, len(rows), per_request):
        chunk = rows[start : start + per_request]
        response = client.post("/models/mlp/1/predict", json={"inputs": {"x": chunk.tolist()}})
        assert response.status_code == 200, response.text


def _metric(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            found[key] = float(value)
    return found


def test_drift_is_flagged_naming_the_feature_and_metrics_agree_with_the_endpoint(
    start_server: StartServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(10)
    repo = _mlp_repo(tmp_path / "models")
    server = start_server(repo, drift_window=500, drift_reference_rows=500)
    with server.client() as client:
        before = client.get("/models/mlp/1/monitor").json()
        assert before["monitor"] is None
        assert "not loaded" in before["reason"]
        _send(client, rng.normal(size=(500, FEATURES)))  # the reference: the first rows
        _send(client, rng.normal(size=(500, FEATURES)))
        calm = client.get("/models/mlp/1/monitor").json()["monitor"]
        assert calm["reference"] == {"source": "first_rows", "rows": 500}
        assert calm["window"] == {"size": 500, "rows": 500}
        assert calm["drift"] is False
        assert calm["inputs"]["x"]["score"] < 0.2
        shifted = rng.normal(size=(500, FEATURES))
        shifted[:, 1] += 2.0
        _send(client, shifted)
        report = client.get("/models/mlp/1/monitor").json()
        monitor = report["monitor"]
        assert report["state"] == "ready"
        assert monitor["drift"] is True
        assert monitor["since"] is not None
        assert monitor["worst"][0]["feature"] == "x[1]"
        assert [f["feature"] for f in monitor["inputs"]["x"]["features"]] == [
            "x[0]",
            "x[1]",
            "x[2]",
            "x[3]",
        ]
        metrics = client.get("/metrics").text
        scores = _metric(metrics, "multiserve_input_drift_score")
        assert scores == {
            'multiserve_input_drift_score{input="x",model="mlp",version="1"}': pytest.approx(
                monitor["inputs"]["x"]["score"], abs=1e-5
            )
        }
        assert _metric(metrics, "multiserve_input_drift") == {
            'multiserve_input_drift{model="mlp",version="1"}': 1.0
        }
        status = client.get("/status").json()
        (version,) = status["models"][0]["versions"]
        assert version["drift"]["drift"] is True
        assert version["drift"]["worst"][0]["feature"] == "x[1]"


def test_reference_from_the_model_directory_file(start_server: StartServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    repo = _mlp_repo(tmp_path / "models")
    np.savez(repo / "mlp" / "reference.npz", x=rng.normal(size=(2000, FEATURES)))
    server = start_server(repo, drift_window=300, drift_reference_rows=0)
    with server.client() as client:
        shifted = rng.normal(size=(300, FEATURES))
        shifted[:, 3] -= 2.0
        _send(client, shifted)
        monitor = client.get("/models/mlp/1/monitor").json()["monitor"]
    assert monitor["reference"]["source"].startswith("file:")
    assert monitor["reference"]["source"].endswith(str(Path("mlp") / "reference.npz"))
    assert monitor["reference"]["rows"] == 2000
    assert monitor["drift"] is True
    assert monitor["worst"][0]["feature"] == "x[3]"


def test_unknown_names_never_become_label_values(start_server: StartServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    repo = _mlp_repo(tmp_path / "models", reference=rng.normal(size=(500, FEATURES)))
    server = start_server(repo, drift_window=200)
    with server.client() as client:
        _send(client, rng.normal(size=(200, FEATURES)))
        assert client.get("/models/nosuch/1/monitor").status_code == 404
        assert client.get("/models/mlp/77/monitor").status_code == 404
        bad = client.post(
            "/models/mlp/1/predict", json={"inputs": {"x": [[0, 0, 0, 0]], "evil": [[1]]}}
        )
        assert bad.status_code == 400
        client.post("/models/nosuch/predict", json={"inputs": [[0, 0, 0, 0]]})
        assert client.get("/models/mlp/1/monitor").json()["monitor"]["drift"] is False
        metrics = client.get("/metrics").text
    drift_lines = [line for line in metrics.splitlines() if "input_drift" in line and "{" in line]
    assert drift_lines
    assert all('model="mlp"' in line for line in drift_lines)
    assert all('input="x"' in line for line in drift_lines if "score" in line)
    assert "nosuch" not in metrics
    assert "evil" not in metrics


def test_drift_window_zero_turns_monitoring_off(start_server: StartServer, tmp_path: Path) -> None:
    server = start_server(_mlp_repo(tmp_path / "models"), drift_window=0)
    with server.client() as client:
        _send(client, np.zeros((10, FEATURES)))
        answer = client.get("/models/mlp/1/monitor").json()
        assert answer["monitor"] is None
        assert "off" in answer["reason"]
        assert "multiserve_input_drift{" not in client.get("/metrics").text


# --- payload samples ------------------------------------------------------------------------


def _samples(directory: Path) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    for path in sorted(directory.glob("payloads*.jsonl")):
        lines += [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return lines


def test_payload_samples_follow_the_rate_and_hold_inputs_and_outputs(
    start_server: StartServer, tmp_path: Path
) -> None:
    log_dir = tmp_path / "payloads"
    server = start_server(
        _mlp_repo(tmp_path / "models"), payload_log_dir=str(log_dir), payload_log_rate=0.25
    )
    with server.client() as client:
        for i in range(400):
            response = client.post("/models/mlp/1/predict", json={"inputs": {"x": [[i, 0, 0, 1]]}})
            assert response.status_code == 200
        payload_log = server.model_server.monitoring.payload_log
        assert payload_log is not None
        wait_for(lambda: payload_log.idle, 5, "the writer to catch up")
        samples = _samples(log_dir)
        metrics = client.get("/metrics").text
    assert 60 <= len(samples) <= 140  # 25% of 400, give or take
    first = samples[0]
    assert first["model"] == "mlp"
    assert first["version"] == "1"
    assert first["inputs"]["x"]["shape"] == [1, 4]
    assert first["inputs"]["x"]["data"][0][3] == 1.0
    assert first["outputs"]["probabilities"]["shape"] == [1, 3]
    assert isinstance(first["timestamp"], float)
    assert f'multiserve_payload_samples_total{{outcome="written"}} {float(len(samples))}' in metrics


def test_payload_samples_rotate_and_stay_within_their_bound(
    start_server: StartServer, tmp_path: Path
) -> None:
    log_dir = tmp_path / "payloads"
    server = start_server(
        _mlp_repo(tmp_path / "models"),
        payload_log_dir=str(log_dir),
        payload_log_rate=1.0,
        payload_log_shapes_only=True,
        payload_log_file_bytes=2000,
        payload_log_max_bytes=6000,
    )
    with server.client() as client:
        for _ in range(300):
            client.post("/models/mlp/1/predict", json={"inputs": {"x": [[1, 2, 3, 4]]}})
    payload_log = server.model_server.monitoring.payload_log
    assert payload_log is not None
    wait_for(lambda: payload_log.written == 300, 5, "every sample written")
    files = list(log_dir.glob("payloads*.jsonl"))
    assert len(files) >= 2
    assert (log_dir / "payloads.jsonl") in files
    assert all(path.stat().st_size <= 2000 for path in files)
    assert sum(path.stat().st_size for path in files) <= 6000 + 2000
    samples = _samples(log_dir)
    assert 0 < len(samples) < 300  # the oldest files were deleted
    assert "data" not in samples[0]["inputs"]["x"]
    assert samples[0]["inputs"]["x"] == {"dtype": "float32", "shape": [1, 4]}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
def test_a_read_only_payload_directory_drops_samples_and_never_fails_a_request(
    start_server: StartServer, tmp_path: Path
) -> None:
    log_dir = tmp_path / "payloads"
    log_dir.mkdir()
    log_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        server = start_server(
            _mlp_repo(tmp_path / "models"), payload_log_dir=str(log_dir), payload_log_rate=1.0
        )
        with server.client() as client:
            for _ in range(50):
                response = client.post(
                    "/models/mlp/1/predict", json={"inputs": {"x": [[1, 2, 3, 4]]}}
                )
                assert response.status_code == 200
            payload_log = server.model_server.monitoring.payload_log
            assert payload_log is not None
            wait_for(lambda: payload_log.dropped == 50, 5, "every sample dropped")
            metrics = client.get("/metrics").text
        assert 'multiserve_payload_samples_total{outcome="dropped"} 50.0' in metrics
        assert list(log_dir.iterdir()) == []
    finally:
        log_dir.chmod(stat.S_IRWXU)


def test_a_payload_directory_that_is_a_file_drops_samples(
    start_server: StartServer, tmp_path: Path
) -> None:
    # Works as root too: nothing can be written "inside" a regular file.
    blocker = tmp_path / "payloads"
    blocker.write_text("not a directory")
    server = start_server(
        _mlp_repo(tmp_path / "models"), payload_log_dir=str(blocker), payload_log_rate=1.0
    )
    with server.client() as client:
        for _ in range(20):
            response = client.post("/models/mlp/1/predict", json={"inputs": {"x": [[1, 2, 3, 4]]}})
            assert response.status_code == 200
    payload_log = server.model_server.monitoring.payload_log
    assert payload_log is not None
    wait_for(lambda: payload_log.dropped == 20, 5, "every sample dropped")
    assert payload_log.written == 0


# --- /status --------------------------------------------------------------------------------


def test_status_shows_models_cache_traffic_and_events(
    start_server: StartServer, tmp_path: Path
) -> None:
    repo = _mlp_repo(tmp_path / "models")
    server = start_server(repo, max_models=3)
    server.model_server.history.interval_s = 0.2
    with server.client() as client:
        for _ in range(20):
            client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]})
        client.post("/models/mlp/predict", json={"inputs": [[1, 2]]})  # a 400
        wait_for(
            lambda: any(
                p["rps"] > 0
                for p in client.get("/status").json()["traffic"]["models"].get("mlp", [])
            ),
            5,
            "a traffic point",
        )
        status = client.get("/status").json()
    assert status["server"]["ready"] is True
    assert status["repository"]["status"] == "ok"
    assert status["cache"]["models"] == 1
    assert status["cache"]["max_models"] == 3
    assert status["models"][0]["name"] == "mlp"
    assert status["models"][0]["latest"] == "1"
    assert status["models"][0]["versions"][0]["state"] == "ready"
    points = status["traffic"]["models"]["mlp"]
    busy = [p for p in points if p["rps"] > 0]
    assert busy[0]["p50_ms"] is not None
    assert sum(p["error_rate"] > 0 for p in busy) >= 1
    assert [e["kind"] for e in status["events"]] == ["loaded"]


# --- Triton's configuration and statistics, over HTTP -------------------------------------


def test_tritonclient_reads_config_and_statistics_over_http(
    start_server: StartServer, model_repo: Path
) -> None:
    server: RunningServer = start_server(model_repo)
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    try:
        metadata = client.get_server_metadata()
        assert {"model_configuration", "statistics"} <= set(metadata["extensions"])
        config = client.get_model_config("adder")
        assert config["name"] == "adder"
        assert config["platform"] == "onnxruntime_onnx"
        assert [(t["name"], t["data_type"], t["dims"]) for t in config["input"]] == [
            ("a", "TYPE_FP32", [-1, 3]),
            ("b", "TYPE_FP32", [-1, 3]),
        ]
        assert client.get_model_config("mlp", "1")["name"] == "mlp"
        x = np.ones((2, 4), dtype=np.float32)
        for _ in range(3):
            tensor = triton.InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("mlp", [tensor], model_version="2")
        (stats,) = client.get_inference_statistics("mlp", "2")["model_stats"]
        assert stats["name"] == "mlp"
        assert stats["version"] == "2"
        assert stats["inference_count"] == 3
        assert stats["execution_count"] >= 3  # the warm-up ran too
        inference = stats["inference_stats"]
        assert inference["success"]["count"] == 3
        assert inference["success"]["ns"] > 0
        assert inference["fail"] == {"count": 0, "ns": 0}  # zero counters are shown
        assert inference["compute_infer"]["count"] == stats["execution_count"]
        assert inference["queue"] == {"count": 0, "ns": 0}
        every = client.get_inference_statistics()["model_stats"]
        assert {(s["name"], s["version"]) for s in every} >= {
            ("mlp", "1"),
            ("mlp", "2"),
            ("adder", "1"),
        }
        both = client.get_inference_statistics("mlp")["model_stats"]
        assert [s["version"] for s in both] == ["2", "1"]
        with pytest.raises(triton.InferenceServerException, match="not found"):
            client.get_model_config("nosuch")
        with pytest.raises(triton.InferenceServerException, match="not found"):
            client.get_inference_statistics("nosuch")
    finally:
        client.close()
