"""The README's lifecycle promises, each checked from outside by what a client or the model
itself can see, so that breaking the promise fails a test (see /work/notes/issue-18.md for the
bug each test was seen to catch).

The models are the tests' ``npz`` backend, which journals what ran (``journal``), holds a load
open until the test lets it go (``load_gate``), refuses to predict once closed, and can hold
memory that it does not report (``allocate_bytes``), as real runtimes do."""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from examples.make_models import scaled_onnx_bytes
from multiserve.backends import BackendRegistry
from tests.conftest import StartServer
from tests.helpers import AUTH, error_of, wait_for
from tests.npz_backend import write_npz_model

ONES = [[1.0, 1.0]]


def add_version(
    root: Path, version: int, factor: float, *, ready: bool = True, **options: object
) -> Path:
    """Version ``version`` of model ``m``: y = x * factor; ``options`` go to its config.toml."""
    version_dir = root / "m" / str(version)
    write_npz_model(version_dir, np.eye(2) * factor)
    lines = [f"{key} = {value!r}" for key, value in options.items()]
    (version_dir / "config.toml").write_text("".join(line + "\n" for line in lines))
    if ready:
        (version_dir / "READY").touch()
    return version_dir


def journal_of(tmp_path: Path, version: int) -> str:
    return str(tmp_path / f"journal-{version}.txt")


def events(tmp_path: Path, version: int) -> list[str]:
    path = Path(journal_of(tmp_path, version))
    return path.read_text().splitlines() if path.exists() else []


def predict(client: httpx.Client, route: str = "/models/m/predict") -> tuple[str, float]:
    response = client.post(route, json={"inputs": ONES})
    assert response.status_code == 200, response.text
    return response.headers["x-model-version"], response.json()["outputs"]["y"][0][0]


def state_of(client: httpx.Client, version: str) -> str:
    versions = client.get("/models/m").json()["versions"]
    return str(next((v["state"] for v in versions if v["version"] == version), "absent"))


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    add_version(root, 1, 1.0, journal=journal_of(tmp_path, 1))
    return root


def test_new_version_runs_its_warm_up_before_its_first_request(
    start_server: StartServer, repo: Path, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    server = start_server(repo, npz_registry)
    with server.client() as client:
        assert predict(client) == ("1", 1.0)  # hot: new versions are swapped in
        # warmup.npz: its sample is the version's first inference, before any request.
        v2 = add_version(repo, 2, 2.0, ready=False, journal=journal_of(tmp_path, 2))
        np.savez(v2 / "warmup.npz", x=np.full((1, 2), 7.0, np.float32))
        (v2 / "READY").touch()
        wait_for(lambda: predict(client)[0] == "2", 10, "version 2")
        assert events(tmp_path, 2)[:3] == ["load", "predict 7.0", "predict 1.0"]
        # warmup.json: the same, from a predict body.
        v3 = add_version(repo, 3, 3.0, ready=False, journal=journal_of(tmp_path, 3))
        (v3 / "warmup.json").write_text('{"inputs": [[5, 5]]}')
        (v3 / "READY").touch()
        wait_for(lambda: predict(client)[0] == "3", 10, "version 3")
        assert events(tmp_path, 3)[:3] == ["load", "predict 5.0", "predict 1.0"]
        # No sample: zeros shaped from the metadata.
        add_version(repo, 4, 4.0, journal=journal_of(tmp_path, 4))
        wait_for(lambda: predict(client)[0] == "4", 10, "version 4")
        assert events(tmp_path, 4)[:3] == ["load", "predict 0.0", "predict 1.0"]


def test_a_failed_warm_up_fails_the_version_and_latest_stays(
    start_server: StartServer, repo: Path, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    server = start_server(repo, npz_registry)
    with server.client() as client:
        assert predict(client) == ("1", 1.0)
        v2 = add_version(repo, 2, 2.0, ready=False, journal=journal_of(tmp_path, 2))
        # The model raises on NaN: its warm-up fails, so the version must not serve.
        np.savez(v2 / "warmup.npz", x=np.full((1, 2), np.nan, np.float32))
        (v2 / "READY").touch()
        wait_for(lambda: state_of(client, "2") == "failed", 10, "the failed warm-up")
        error = next(v for v in client.get("/models/m").json()["versions"] if v["version"] == "2")
        assert "warm-up" in error["error"]
        assert client.get("/models/m").json()["latest"] == "1"
        assert predict(client) == ("1", 1.0)
        assert "close" in events(tmp_path, 2)  # the failed model was closed, not leaked
        explicit = client.post("/models/m/2/predict", json={"inputs": ONES})
        assert error_of(explicit, 503)["code"] == "model_load_failed"


def test_latest_moves_only_once_the_new_version_is_loaded(
    start_server: StartServer, repo: Path, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    gate = tmp_path / "gate"
    server = start_server(repo, npz_registry)
    with server.client() as client:
        assert predict(client) == ("1", 1.0)
        add_version(repo, 2, 2.0, load_gate=str(gate), journal=journal_of(tmp_path, 2))
        try:
            wait_for(lambda: state_of(client, "2") == "loading", 10, "version 2 to load")
            # Its load is held open: requests keep being answered by version 1, at once (a
            # request that waited for the load would time out here), and latest says 1.
            with httpx.Client(base_url=server.url, timeout=5) as quick:
                for _ in range(5):
                    assert predict(quick) == ("1", 1.0)
            assert client.get("/models/m").json()["latest"] == "1"
            assert events(tmp_path, 2) == []  # not even loaded yet
        finally:
            gate.touch()
        wait_for(lambda: predict(client)[0] == "2", 10, "version 2 after its load")
        assert events(tmp_path, 2)[:2] == ["load", "predict 0.0"]


def test_a_labelled_version_stays_loaded_after_a_swap_and_serves_native_and_v2(
    start_server: StartServer, repo: Path, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    server = start_server(repo, npz_registry)
    with server.client() as client:
        assert predict(client) == ("1", 1.0)
        labelled = client.put("/admin/models/m/labels/stable", headers=AUTH, json={"version": "1"})
        assert labelled.status_code == 200, labelled.text
        add_version(repo, 2, 2.0)
        wait_for(lambda: predict(client)[0] == "2", 10, "version 2")
        # The version policy retires older versions at the swap, but not a labelled one.
        assert state_of(client, "1") == "ready"
        assert predict(client, "/models/m/stable/predict") == ("1", 1.0)
        v2 = client.post(
            "/v2/models/m/versions/stable/infer",
            json={"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 1]}]},
        )
        assert v2.status_code == 200, v2.text
        assert v2.json()["model_version"] == "1"
        assert v2.json()["outputs"][0]["data"] == [1.0, 1.0]
        assert events(tmp_path, 1).count("load") == 1  # served from memory, never reloaded
        # Without its label, the next swap retires it (drained, then closed).
        assert client.delete("/admin/models/m/labels/stable", headers=AUTH).status_code == 200
        add_version(repo, 3, 3.0)
        wait_for(lambda: predict(client)[0] == "3", 10, "version 3")
        wait_for(lambda: "close" in events(tmp_path, 1), 10, "version 1 to close")
        assert state_of(client, "1") == "available"


def test_a_version_deleted_during_a_request_closes_only_after_it(
    start_server: StartServer, repo: Path, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    add_version(repo, 2, 2.0, predict_delay_s=1.0, journal=journal_of(tmp_path, 2))
    server = start_server(repo, npz_registry, version_policy="all")
    with server.client() as client:
        assert client.post("/admin/models/m/2/load", headers=AUTH).status_code == 200
        results: list[httpx.Response] = []
        running = threading.Thread(
            target=lambda: results.append(client.post("/models/m/2/predict", json={"inputs": ONES}))
        )
        running.start()
        wait_for(lambda: "predict 1.0" in events(tmp_path, 2), 10, "the request to start")
        for path in sorted((repo / "m" / "2").iterdir()):
            path.unlink()
        (repo / "m" / "2").rmdir()
        wait_for(lambda: client.get("/models/m/2").status_code == 404, 10, "the 404")
        running.join(timeout=30)
        # The model closes after the request, which finished on it: a model closed under a
        # running request (as a close that does not drain would) makes that request fail.
        assert results[0].status_code == 200, results[0].text
        assert results[0].json()["outputs"]["y"] == [[2.0, 2.0]]
        wait_for(lambda: "close" in events(tmp_path, 2), 10, "the retired version to close")
        assert events(tmp_path, 2)[-2:] == ["predict 1.0", "close"]


def test_memory_a_model_holds_beyond_its_own_figure_counts_against_the_budget(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    root = tmp_path / "models"
    # Reports 16 bytes (its weights), holds 96 MiB more: the measured growth is what counts.
    add_version(root, 1, 1.0, allocate_bytes=96 * 1024 * 1024)
    small = root / "small" / "1"
    small.mkdir(parents=True)
    (small / "model.onnx").write_bytes(scaled_onnx_bytes(1.0))
    (small / "READY").touch()
    server = start_server(root, npz_registry, max_memory="48MiB")
    with server.client() as client:
        x = {"inputs": [[1.0, 2.0, 3.0, 4.0]]}
        assert client.post("/models/small/predict", json=x).status_code == 200
        refused = client.post("/models/m/predict", json={"inputs": ONES})
        assert error_of(refused, 507)["code"] == "insufficient_memory"
        # Nothing was evicted for it.
        assert state_of(client, "1") != "ready"
        small_state = client.get("/models/small").json()["versions"][0]["state"]
        assert small_state == "ready"


def test_an_onnx_model_larger_than_the_budget_is_refused_and_evicts_nothing(
    start_server: StartServer, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    for name, padding in (("small", 1024 * 1024), ("large", 24 * 1024 * 1024)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0, padding))
        (root / name / "1" / "READY").touch()
    server = start_server(root, max_memory="8MiB")
    x = {"inputs": [[1.0, 2.0, 3.0, 4.0]]}
    with server.client() as client:
        assert client.post("/models/small/predict", json=x).json()["outputs"]["y"] == [
            [2.0, 4.0, 6.0, 8.0]
        ]
        refused = client.post("/models/large/predict", json=x)
        assert error_of(refused, 507)["code"] == "insufficient_memory"
        assert client.get("/models/small").json()["versions"][0]["state"] == "ready"
        cache = client.get("/admin/cache", headers=AUTH).json()
        assert [entry["name"] for entry in cache["entries"]] == ["small"]


def test_unmatched_paths_share_one_metric_label(client: httpx.Client) -> None:
    """Raw paths never become label values: a scanner probing random paths must not grow the
    metrics without bound."""
    probes = [f"/probe-{n}/x{n}" for n in range(5)] + ["/models/mlp/1/nonsense"]
    for path in probes:
        assert client.get(path).status_code == 404
    scrape = client.get("/metrics").text
    for path in probes:
        assert path not in scrape
    unmatched = [
        line
        for line in scrape.splitlines()
        if line.startswith("multiserve_http_requests_total{")
        and 'route="unmatched"' in line
        and 'status="404"' in line
    ]
    assert len(unmatched) == 1, unmatched
    assert float(unmatched[0].rsplit(" ", 1)[1]) >= len(probes)


def test_a_bad_request_in_a_batch_fails_alone(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    """A request that passes every check but makes the model raise (NaN here) breaks the
    batched call it shares: each of its requests is then run alone, so only it fails."""
    root = tmp_path / "models"
    add_version(
        root, 1, 3.0, max_batch_size=8, predict_delay_s=0.5, journal=journal_of(tmp_path, 1)
    )
    server = start_server(root, npz_registry)
    with server.client() as client:
        assert predict(client) == ("1", 3.0)
    rows = [[float(n), 1.0] for n in range(2, 9)]
    rows[3] = [float("nan"), 1.0]

    def ask(row: list[float]) -> httpx.Response:
        # .npy carries NaN (JSON cannot): the request passes every check of the server.
        stream = io.BytesIO()
        np.save(stream, np.asarray([row], np.float32))
        with server.client() as own:
            return own.post(
                "/models/m/predict",
                content=stream.getvalue(),
                headers={"content-type": "application/x-npy"},
            )

    with ThreadPoolExecutor(8) as pool:
        blocker = pool.submit(ask, [1.0, 1.0])  # holds the worker while the others queue
        wait_for(lambda: events(tmp_path, 1).count("predict 1.0") == 2, 10, "the blocker")
        answers = list(pool.map(ask, rows))
        assert blocker.result().status_code == 200
    for row, answer in zip(rows, answers, strict=True):
        if np.isnan(row[0]):
            assert error_of(answer, 500)["code"] == "prediction_failed"
        else:
            assert answer.status_code == 200, answer.text
            assert answer.json()["outputs"]["y"] == [[row[0] * 3.0, 3.0]]
    # The shared call was tried (and broke) before the requests ran alone.
    assert any("rows=" in event for event in events(tmp_path, 1)), events(tmp_path, 1)
