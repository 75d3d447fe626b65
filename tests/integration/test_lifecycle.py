"""The live repository: versions dropped in, copied slowly, corrupted, fixed, and deleted while
the server runs and clients keep predicting."""

from __future__ import annotations

import functools
import hashlib
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from examples.make_models import scaled_onnx_bytes, write_mlp_onnx
from multiserve.backends import BackendRegistry
from tests.conftest import StartServer
from tests.helpers import AUTH, wait_for
from tests.npz_backend import write_npz_model

X = [[1.0, 2.0, 3.0, 4.0]]


def served_version(client: httpx.Client, model: str = "m") -> str:
    response = client.post(f"/models/{model}/predict", json={"inputs": X})
    assert response.status_code == 200, response.text
    return str(response.json()["model_version"])


def serves_version(client: httpx.Client, version: str) -> bool:
    return served_version(client) == version


def copy_slowly(data: bytes, target: Path, chunks: int = 8, pause: float = 0.05) -> None:
    """Write ``data`` the way a slow copy does: in chunks, with pauses shorter than the settle
    window."""
    target.parent.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // chunks)
    with target.open("wb") as stream:
        for offset in range(0, len(data), step):
            stream.write(data[offset : offset + step])
            stream.flush()
            time.sleep(pause)


def version_state(client: httpx.Client, model: str, version: str) -> dict[str, object]:
    versions = client.get(f"/models/{model}").json()["versions"]
    found: dict[str, object] = next((v for v in versions if v["version"] == version), {})
    return found


def mark_ready(root: Path) -> Path:
    """Drop the READY marker into every version, as a writer that just finished would, so that
    servers started right away need not wait out the settle window."""
    for version_dir in root.glob("*/*"):
        if version_dir.is_dir():
            (version_dir / "READY").touch()
    return root


@pytest.fixture
def scaled_repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(1.0, 256 * 1024))
    return mark_ready(root)


def test_hot_swap_under_load_fails_no_request(start_server: StartServer, scaled_repo: Path) -> None:
    server = start_server(scaled_repo, settle_window_s=0.3)
    stop = threading.Event()
    answers: list[tuple[int, str, float, list[list[float]]]] = []

    def predict_continuously(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with server.client() as client:
            while not stop.is_set():
                x = rng.normal(size=(1, 4)).astype(np.float32)
                response = client.post("/models/m/predict", json={"inputs": x.tolist()})
                version = response.headers.get("x-model-version", "")
                y = response.json()["outputs"]["y"] if response.status_code == 200 else []
                answers.append((response.status_code, version, float(x[0, 0]), y))

    clients = [threading.Thread(target=predict_continuously, args=(seed,)) for seed in range(3)]
    for thread in clients:
        thread.start()
    delays = []
    try:
        with server.client() as probe:
            assert served_version(probe) == "1"
            for number in range(2, 9):
                data = scaled_onnx_bytes(float(number), 256 * 1024)
                copy_slowly(data, scaled_repo / "m" / str(number) / "model.onnx")
                serves = functools.partial(serves_version, probe, str(number))
                delays.append(wait_for(serves, 10, f"version {number}"))
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)

    assert len(answers) > 100
    assert [a for a in answers if a[0] != 200] == []
    for _, version, x0, y in answers:
        # Every answer comes from one complete version: y = x * version, exactly.
        assert np.float32(y[0][0]) == np.float32(x0) * np.float32(int(version))
    seen = {a[1] for a in answers}
    assert seen >= {"1", "8"}
    # Settle window 0.3 s, then load and warm-up; "about a second" with CI noise to spare.
    assert statistics.median(delays) < 1.5, delays
    assert max(delays) < 4.0, delays
    lifecycle = server.model_server.lifecycle
    assert lifecycle.swaps >= 7
    # The version policy keeps only the newest loaded.
    wait_for(lambda: [k for k in lifecycle.cache] == [("m", 8)], 5, "older versions to retire")


def test_half_copied_version_is_never_served(start_server: StartServer, scaled_repo: Path) -> None:
    server = start_server(scaled_repo, settle_window_s=0.5)
    states = []
    with server.client() as client:
        assert served_version(client) == "1"
        data = scaled_onnx_bytes(2.0, 1024 * 1024)
        target = scaled_repo / "m" / "2" / "model.onnx"
        target.parent.mkdir()
        step = len(data) // 10
        with target.open("wb") as stream:
            for offset in range(0, len(data), step):
                stream.write(data[offset : offset + step])
                stream.flush()
                time.sleep(0.1)
                assert served_version(client) == "1"
                states.append(version_state(client, "m", "2").get("state"))
        wait_for(lambda: served_version(client) == "2", 10, "the complete version")
        assert client.post("/models/m/2/predict", json={"inputs": X}).json()["outputs"]["y"] == [
            [2.0, 4.0, 6.0, 8.0]
        ]
    assert set(states) <= {"settling"}, states
    assert server.model_server.lifecycle.load_failures == 0


def test_explicit_request_for_a_settling_version_is_503_with_retry_after(
    start_server: StartServer, scaled_repo: Path
) -> None:
    # A request waits settle_wait_s for a settling version before the 503.
    server = start_server(scaled_repo, settle_window_s=60, settle_wait_s=0.3)
    with server.client() as client:
        (scaled_repo / "m" / "2").mkdir()
        (scaled_repo / "m" / "2" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
        wait_for(lambda: "2" in str(client.get("/models/m").json()), 5, "version 2 to be seen")
        response = client.post("/models/m/2/predict", json={"inputs": X})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "version_settling"
        assert response.headers["retry-after"] == "1"
        assert served_version(client) == "1"


def test_marker_file_makes_a_version_loadable_at_once(
    start_server: StartServer, scaled_repo: Path
) -> None:
    server = start_server(scaled_repo, settle_window_s=60)
    with server.client() as client:
        assert served_version(client) == "1"
        (scaled_repo / "m" / "2").mkdir()
        (scaled_repo / "m" / "2" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
        # Seen by a scan, and settling: a 60 s settle window, so not served yet.
        wait_for(lambda: version_state(client, "m", "2").get("state") == "settling", 5, "a scan")
        assert served_version(client) == "1"
        (scaled_repo / "m" / "2" / "READY").touch()
        wait_for(lambda: served_version(client) == "2", 5, "version 2 after its marker")


def test_new_model_appears_while_serving(start_server: StartServer, scaled_repo: Path) -> None:
    server = start_server(scaled_repo, settle_window_s=0.2)
    with server.client() as client:
        assert client.post("/models/fresh/predict", json={"inputs": X}).status_code == 404
        (scaled_repo / "fresh" / "3").mkdir(parents=True)
        (scaled_repo / "fresh" / "3" / "model.onnx").write_bytes(scaled_onnx_bytes(3.0))
        wait_for(
            lambda: client.post("/models/fresh/predict", json={"inputs": X}).status_code == 200,
            5,
            "fresh",
        )
        assert served_version(client, "fresh") == "3"


def test_corrupt_new_version_never_becomes_latest_and_fixing_it_retries(
    start_server: StartServer, scaled_repo: Path
) -> None:
    server = start_server(scaled_repo, settle_window_s=0.2)
    with server.client() as client:
        assert served_version(client) == "1"  # the model is hot
        (scaled_repo / "m" / "2").mkdir()
        (scaled_repo / "m" / "2" / "model.onnx").write_bytes(b"\x08\x07garbage that is not onnx")
        wait_for(lambda: version_state(client, "m", "2").get("state") == "failed", 5, "the failure")
        failed = version_state(client, "m", "2")
        assert "m version 2" in str(failed["error"])
        assert client.get("/models/m").json()["latest"] == "1"
        for _ in range(20):
            assert served_version(client) == "1"
        # Fixing the file retries the version.
        (scaled_repo / "m" / "2" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
        wait_for(lambda: served_version(client) == "2", 5, "the fixed version")
        assert "error" not in version_state(client, "m", "2")


def test_checksum_sidecar_must_match(start_server: StartServer, scaled_repo: Path) -> None:
    server = start_server(scaled_repo, settle_window_s=0.2)
    data = scaled_onnx_bytes(2.0)
    with server.client() as client:
        assert served_version(client) == "1"
        version_dir = scaled_repo / "m" / "2"
        version_dir.mkdir()
        (version_dir / "model.onnx.sha256").write_text("0" * 64 + "  model.onnx\n")
        (version_dir / "model.onnx").write_bytes(data)
        wait_for(
            lambda: version_state(client, "m", "2").get("state") == "failed", 5, "the mismatch"
        )
        assert "does not match model.onnx.sha256" in str(version_state(client, "m", "2")["error"])
        assert served_version(client) == "1"
        (version_dir / "model.onnx.sha256").write_text(
            hashlib.sha256(data).hexdigest() + "  model.onnx\n"
        )
        wait_for(lambda: served_version(client) == "2", 5, "the verified version")


def test_changed_files_of_a_loaded_version_are_reloaded_before_serving(
    start_server: StartServer, scaled_repo: Path
) -> None:
    server = start_server(scaled_repo, settle_window_s=0.2)
    with server.client() as client:
        assert client.post("/models/m/1/predict", json={"inputs": X}).json()["outputs"]["y"] == [
            X[0]
        ]
        replacement = scaled_repo / "replacement.tmp"
        replacement.write_bytes(scaled_onnx_bytes(10.0))
        replacement.replace(scaled_repo / "m" / "1" / "model.onnx")

        def doubled() -> bool:
            response = client.post("/models/m/1/predict", json={"inputs": X})
            assert response.status_code == 200
            return bool(response.json()["outputs"]["y"] == [[10.0, 20.0, 30.0, 40.0]])

        wait_for(doubled, 5, "the new files of version 1")


def test_deleting_a_version_drains_it_then_404s(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.eye(2))
    write_npz_model(tmp_path / "slow" / "2", np.eye(2) * 2)
    journal = tmp_path / "journal.txt"
    (tmp_path / "slow" / "config.toml").write_text(
        f"predict_delay_s = 1.0\nversion_policy = 'all'\njournal = '{journal}'\n"
    )
    server = start_server(mark_ready(tmp_path), npz_registry, settle_window_s=0.2)
    with server.client() as client:
        assert client.post("/admin/models/slow/2/load", headers=AUTH).status_code == 200
        model = server.model_server.lifecycle.cache.peek(("slow", 2))
        assert model is not None
        results: list[httpx.Response] = []
        running = threading.Thread(
            target=lambda: results.append(
                client.post("/models/slow/2/predict", json={"inputs": [[1, 1]]})
            )
        )
        running.start()
        # The request is running inside the model (the journal says so) before the delete.
        wait_for(lambda: "predict 1.0" in journal.read_text(), 10, "the request to start")
        shutil.rmtree(tmp_path / "slow" / "2")
        wait_for(
            lambda: (
                client.post("/models/slow/2/predict", json={"inputs": [[1, 1]]}).status_code == 404
            ),
            5,
            "404",
        )
        running.join(timeout=10)
        assert results[0].status_code == 200
        assert results[0].json()["outputs"]["y"] == [[2.0, 2.0]]
        wait_for(lambda: model.model.closed, 5, "the retired version to close")  # type: ignore[union-attr]
        latest = client.post("/models/slow/predict", json={"inputs": [[1, 1]]})
        assert latest.headers["x-model-version"] == "1"


def test_deleting_a_model_retires_every_version(
    start_server: StartServer, model_repo: Path
) -> None:
    server = start_server(mark_ready(model_repo), settle_window_s=0.2)
    with server.client() as client:
        for version in ("1", "2"):
            assert (
                client.post(f"/models/mlp/{version}/predict", json={"inputs": X}).status_code == 200
            )
        shutil.rmtree(model_repo / "mlp")
        wait_for(lambda: client.get("/models/mlp").status_code == 404, 5, "the model to go")
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 404
        lifecycle = server.model_server.lifecycle
        assert not [key for key in lifecycle.cache if key[0] == "mlp"]


def test_version_policy_all_keeps_older_versions_loaded(
    start_server: StartServer, scaled_repo: Path
) -> None:
    server = start_server(scaled_repo, settle_window_s=0.2, version_policy="all")
    with server.client() as client:
        assert served_version(client) == "1"
        (scaled_repo / "m" / "2").mkdir()
        (scaled_repo / "m" / "2" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
        wait_for(lambda: served_version(client) == "2", 5, "version 2")
        assert set(server.model_server.lifecycle.cache) == {("m", 1), ("m", 2)}


def test_cold_model_new_version_loads_lazily(start_server: StartServer, model_repo: Path) -> None:
    server = start_server(mark_ready(model_repo), settle_window_s=0.2)
    lifecycle = server.model_server.lifecycle
    with server.client() as client:
        write_mlp_onnx(model_repo / "mlp" / "3" / "model.onnx", seed=3)
        wait_for(lambda: client.get("/models/mlp").json()["latest"] == "3", 5, "version 3 listed")
        assert lifecycle.loads == 0  # nothing was hot: nothing loads before it is asked for
        assert served_version(client, "mlp") == "3"


def test_a_tight_cache_under_concurrent_demand_never_serves_a_closed_model(
    start_server: StartServer, tmp_path: Path
) -> None:
    # Four models through a cache of two, from eight clients at once: models are loaded,
    # evicted and reloaded constantly, and a request must never land on one that is closing.
    for name in "abcd":
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0, 512 * 1024))
    server = start_server(mark_ready(tmp_path), max_models=2)
    statuses: list[int] = []
    deadline = time.monotonic() + 4

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with server.client() as client:
            while time.monotonic() < deadline:
                name = "abcd"[int(rng.integers(4))]
                response = client.post(f"/models/{name}/predict", json={"inputs": X})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    assert response.json()["outputs"]["y"] == [[2.0, 4.0, 6.0, 8.0]]
                else:
                    assert response.json()["error"]["code"] == "cache_thrashing", response.text

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(statuses) > 50
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) > 0.9 * len(statuses)
    assert len(server.model_server.lifecycle.cache) <= 2
