"""No repository fault takes the models down: a root deleted and recreated, a listing that
suddenly holds nothing, files gone before their load, events the watch never delivered."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from examples.make_models import scaled_onnx_bytes
from tests.conftest import RunningServer, StartServer
from tests.helpers import wait_for

X = [[1.0, 2.0, 3.0, 4.0]]


def write_model(root: Path, name: str, factor: float, version: int = 1) -> None:
    (root / name / str(version)).mkdir(parents=True, exist_ok=True)
    (root / name / str(version) / "model.onnx").write_bytes(scaled_onnx_bytes(factor))
    (root / name / str(version) / "READY").touch()


def answers(client: httpx.Client, name: str) -> int:
    return client.post(f"/models/{name}/predict", json={"inputs": X}).status_code


@contextmanager
def traffic(server: RunningServer, name: str) -> Iterator[list[int]]:
    """Clients predicting ``name`` continuously while the block runs; their statuses."""
    statuses: list[int] = []
    stop = threading.Event()

    def run() -> None:
        with server.client() as client:
            while not stop.is_set():
                statuses.append(answers(client, name))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def readiness(client: httpx.Client) -> str:
    return str(client.get("/readyz").json()["status"])


def test_deleted_root_keeps_models_serving_and_its_return_is_picked_up(
    start_server: StartServer, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    write_model(root, "m", 2.0)
    write_model(root, "other", 3.0)
    # No waiting on requests for unscanned models: only the watch can find "later" in time.
    server = start_server(root, settle_wait_s=0)
    with server.client() as client:
        assert answers(client, "m") == 200  # loaded
        with traffic(server, "m") as statuses:
            # Gone at once, as an unmount does (`rm -rf` can be seen half done, and a listing
            # that lost only some models retires those, as it should).
            root.rename(tmp_path / "trash")
            shutil.rmtree(tmp_path / "trash")
            wait_for(lambda: readiness(client) == "degraded", 10, "degraded readiness")
            ready = client.get("/readyz")
            assert ready.status_code == 200  # the loaded models serve: keep routing here
            assert "cannot be read" in ready.json()["reason"]
            repository = client.get("/models").json()["repository"]
            assert repository["status"] == "degraded"
            assert repository["reason"] == ready.json()["reason"]
            seen = len(statuses)
            wait_for(lambda: len(statuses) > seen + 20, 10, "traffic during the outage")
            # It comes back, recreated, with a model it never had.
            staging = tmp_path / "staging"
            write_model(staging, "m", 2.0)
            write_model(staging, "fresh", 5.0)
            staging.rename(root)
            wait_for(lambda: answers(client, "fresh") == 200, 10, "the new model")
            wait_for(lambda: readiness(client) == "ready", 10, "readiness")
            # Still watched: a model added now is seen too.
            write_model(root, "later", 7.0)
            wait_for(lambda: answers(client, "later") == 200, 10, "a model added after")
        assert statuses
        assert set(statuses) == {200}, sorted(set(statuses))
        assert answers(client, "other") == 404  # gone from the returned root: retired


def test_empty_listing_is_held_for_the_grace_period_before_models_retire(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_model(tmp_path, "m", 2.0)
    server = start_server(tmp_path, empty_grace_s=1.5)
    with server.client() as client:
        assert answers(client, "m") == 200
        shutil.rmtree(tmp_path / "m")
        wait_for(lambda: readiness(client) == "degraded", 10, "degraded readiness")
        assert "lists no models" in client.get("/readyz").json()["reason"]
        assert answers(client, "m") == 200  # still loaded, still serving
        wait_for(lambda: answers(client, "m") == 404, 10, "the grace period to end")
        assert readiness(client) == "ready"


def test_listing_that_loses_some_models_retires_them_at_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_model(tmp_path, "a", 2.0)
    write_model(tmp_path, "b", 3.0)
    server = start_server(tmp_path, empty_grace_s=60)
    with server.client() as client:
        assert answers(client, "a") == 200
        shutil.rmtree(tmp_path / "a")
        wait_for(lambda: answers(client, "a") == 404, 5, "a to retire")
        assert readiness(client) == "ready"


def test_periodic_rescan_finds_what_no_event_announced(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_model(tmp_path, "m", 2.0)
    server = start_server(tmp_path, watch=False, rescan_interval_s=0.3, settle_wait_s=0)
    with server.client() as client:
        wait_for(lambda: readiness(client) == "ready", 10, "ready")
        write_model(tmp_path, "late", 4.0)
        wait_for(lambda: client.get("/models/late").status_code == 200, 10, "the rescan")


def test_load_whose_files_are_gone_answers_404_not_503(
    start_server: StartServer, tmp_path: Path
) -> None:
    write_model(tmp_path, "m", 2.0)
    write_model(tmp_path, "gone", 2.0)
    # Nothing tells the server the files went: no watch, no periodic rescan.
    server = start_server(tmp_path, watch=False, rescan_interval_s=0)
    with server.client() as client:
        wait_for(lambda: readiness(client) == "ready", 10, "ready")
        shutil.rmtree(tmp_path / "gone")
        response = client.post("/models/gone/predict", json={"inputs": X})
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
        assert client.get("/models/gone").status_code == 404
        assert answers(client, "m") == 200
