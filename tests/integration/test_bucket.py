"""Serving from an S3 bucket: a real S3 HTTP API (moto's server on 127.0.0.1) and the same
obstore client code that production uses."""

from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from moto.server import ThreadedMotoServer

from examples.make_models import scaled_onnx_bytes, write_mlp_onnx
from multiserve.repository.bucket import BucketRepository
from tests.conftest import RunningServer, StartServer
from tests.helpers import AUTH, wait_for

X = [[1.0, 2.0, 3.0, 4.0]]


class S3:
    """A moto S3 server on loopback that can be stopped and started again on the same port."""

    def __init__(self, bucket: str) -> None:
        self.bucket = bucket
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def put(self, key: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body)

    def stop(self) -> None:
        self._server.stop()

    def restart(self) -> None:
        # moto keeps its buckets in the process, so a new server on the port sees them.
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    # moto keeps buckets for the life of the process: each test gets its own.
    server = S3(f"models-{uuid.uuid4().hex[:12]}")
    server.client.create_bucket(Bucket=server.bucket)
    yield server
    server.stop()


@pytest.fixture
def bucket_server(
    start_server: StartServer, s3: S3, tmp_path: Path
) -> Callable[..., RunningServer]:
    def start(**settings: Any) -> RunningServer:
        return start_server(
            f"s3://{s3.bucket}",
            bucket_endpoint=s3.url,
            bucket_allow_http=True,
            bucket_region="us-east-1",
            disk_cache_dir=str(tmp_path / "cache"),
            **{"poll_interval_s": 0.3, **settings},
        )

    return start


def upload_mlp(s3: S3, tmp_path: Path, version: int, seed: int) -> bytes:
    path = write_mlp_onnx(tmp_path / "build" / f"{version}.onnx", seed=seed)
    data = path.read_bytes()
    s3.put(f"mlp/{version}/model.onnx", data)
    return data


def serves(client: httpx.Client, version: str) -> bool:
    return latest_of(client, "m") == version


def latest_of(client: httpx.Client, name: str) -> str | None:
    response = client.get(f"/models/{name}")
    return response.json().get("latest") if response.status_code == 200 else None


def test_serves_a_model_from_the_bucket(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    data = upload_mlp(s3, tmp_path, 1, seed=1)
    server = bucket_server()
    with server.client() as client:
        wait_for(lambda: latest_of(client, "mlp") == "1", 10, "mlp in the listing")
        x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
        response = client.post("/models/mlp/predict", json={"inputs": x.tolist()})
        assert response.status_code == 200, response.text
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        np.testing.assert_array_equal(
            np.asarray(response.json()["outputs"]["probabilities"], np.float32),
            session.run(None, {"x": x})[0],
        )
        listing = client.get("/models").json()
        assert listing["repository"] == {"source": f"s3://{s3.bucket}", "status": "ok"}


def test_a_version_is_complete_only_after_two_identical_listings_or_its_marker(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    upload_mlp(s3, tmp_path, 1, seed=1)
    s3.put("marked/1/model.onnx", scaled_onnx_bytes(1.0))
    s3.put("marked/1/READY", b"")
    # One listing during this test; the objects are younger than the settle window, so only the
    # marker completes a version; start-up gives up waiting for the other after 0.5 s.
    server = bucket_server(
        poll_interval_s=60, settle_window_s=60, startup_timeout_s=0.5, settle_wait_s=0
    )
    with server.client() as client:
        wait_for(lambda: server.model_server.scanned, 10, "the first listing")
        waiting = client.get("/readyz")
        if waiting.status_code == 503:  # unless the start-up timeout already passed
            assert "settling: mlp version 1" in waiting.json()["reason"]
        wait_for(lambda: server.model_server.ready, 10, "the start-up timeout")
        marked = client.post("/models/marked/predict", json={"inputs": X})
        assert marked.status_code == 200
        unmarked = client.post("/models/mlp/predict", json={"inputs": X})
        assert unmarked.status_code == 503
        assert unmarked.json()["error"]["code"] == "version_settling"
        assert unmarked.headers["retry-after"] == "1"


def test_version_uploaded_object_by_object_is_never_served_half_complete(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    s3.put("m/1/model.onnx", scaled_onnx_bytes(1.0))
    server = bucket_server(poll_interval_s=0.5)
    with server.client() as client:
        wait_for(lambda: latest_of(client, "m") == "1", 10, "version 1")
        assert client.post("/models/m/predict", json={"inputs": X}).status_code == 200  # hot
        parts = {
            "m/2/model.onnx": scaled_onnx_bytes(2.0, 64 * 1024),
            "m/2/warmup.json": b'{"inputs": [[1, 1, 1, 1]]}',
            "m/2/config.toml": b"intra_op_threads = 1\n",
            "m/2/NOTES.txt": b"trained on tuesday",
        }
        states = []
        for key, body in parts.items():
            s3.put(key, body)
            time.sleep(0.15)  # well inside one poll interval
            response = client.post("/models/m/predict", json={"inputs": X})
            assert response.json()["model_version"] == "1"
            versions = client.get("/models/m").json()["versions"]
            version = next((v for v in versions if v["version"] == "2"), {"state": "not listed"})
            states.append(version["state"])
        assert set(states) <= {"not listed", "settling"}, states
        wait_for(
            lambda: (
                client.post("/models/m/predict", json={"inputs": X}).json()["model_version"] == "2"
            ),
            10,
            "v2",
        )
    cached = server.model_server.lifecycle.catalog.find(("m", 2))
    assert cached is not None
    assert sorted(p.name for p in cached.path.iterdir()) == [
        "NOTES.txt",
        "config.toml",
        "model.onnx",
        "warmup.json",
    ]


def test_uploaded_version_is_swapped_in_under_load_without_a_failed_request(
    bucket_server: Callable[..., RunningServer], s3: S3
) -> None:
    s3.put("m/1/model.onnx", scaled_onnx_bytes(1.0, 128 * 1024))
    server = bucket_server(poll_interval_s=0.3)
    stop = threading.Event()
    answers: list[tuple[int, str, float]] = []

    def predict_continuously() -> None:
        with server.client() as client:
            while not stop.is_set():
                response = client.post("/models/m/predict", json={"inputs": X})
                y = response.json()["outputs"]["y"][0][0] if response.status_code == 200 else -1.0
                answers.append(
                    (response.status_code, response.headers.get("x-model-version", ""), y)
                )

    with server.client() as client:
        wait_for(lambda: latest_of(client, "m") == "1", 10, "version 1")
        threads = [threading.Thread(target=predict_continuously) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            for version in (2, 3, 4):
                s3.put(f"m/{version}/model.onnx", scaled_onnx_bytes(float(version), 128 * 1024))
                wait_for(functools.partial(serves, client, str(version)), 15, f"v{version}")
            # Load after the last swap too: 20 more answers, however long they take.
            answered = len(answers)
            wait_for(lambda: len(answers) >= answered + 20, 20, "answers after the last swap")
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
    assert answers
    assert [a for a in answers if a[0] != 200] == []
    assert all(y == float(version) for _, version, y in answers)  # x[0] is 1: y is the version
    assert {"1", "4"} <= {version for _, version, _ in answers}


def test_outage_keeps_loaded_models_serving_and_recovers(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    upload_mlp(s3, tmp_path, 1, seed=1)
    server = bucket_server(poll_interval_s=0.2)
    with server.client() as client:
        wait_for(lambda: latest_of(client, "mlp") == "1", 10, "mlp")
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
        s3.stop()
        wait_for(
            lambda: client.get("/readyz").json()["status"] == "degraded", 20, "degraded readiness"
        )
        ready = client.get("/readyz")
        assert ready.status_code == 200
        reason = ready.json()["reason"]
        assert "cannot be read" in reason
        # One readable line naming the cause, not the client's debug dump.
        assert "\n" not in reason, reason
        assert "Debug source" not in reason
        assert len(reason) < 400, reason
        assert "Connection refused" in reason, reason
        repository = client.get("/models").json()["repository"]
        assert repository["status"] == "degraded"
        assert repository["reason"]
        for _ in range(20):
            assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
        assert ("mlp", 1) in server.model_server.lifecycle.cache
        s3.restart()
        wait_for(lambda: client.get("/readyz").json() == {"status": "ready"}, 30, "recovery")
        assert client.get("/models").json()["repository"]["status"] == "ok"
        upload_mlp(s3, tmp_path, 2, seed=2)
        wait_for(
            lambda: (
                client.post("/models/mlp/predict", json={"inputs": X}).json()["model_version"]
                == "2"
            ),
            15,
            "v2",
        )


def test_memory_eviction_reloads_from_disk_without_a_download(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    upload_mlp(s3, tmp_path, 1, seed=1)
    server = bucket_server()
    repository = server.model_server.repository
    assert isinstance(repository, BucketRepository)
    with server.client() as client:
        wait_for(lambda: latest_of(client, "mlp") == "1", 10, "mlp")
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
        assert repository.downloads == 1
        assert client.post("/admin/models/mlp/1/evict", headers=AUTH).status_code == 200
        assert ("mlp", 1) not in server.model_server.lifecycle.cache
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
        assert repository.downloads == 1
        assert server.model_server.lifecycle.loads == 2


def test_disk_cache_is_bounded_and_evicts_least_recently_used(
    bucket_server: Callable[..., RunningServer], s3: S3
) -> None:
    size = 512 * 1024
    for name in ("a", "b", "c"):
        s3.put(f"{name}/1/model.onnx", scaled_onnx_bytes(1.0, size))
    server = bucket_server(disk_cache_bytes=int(2.5 * size))
    repository = server.model_server.repository
    assert isinstance(repository, BucketRepository)
    with server.client() as client:
        wait_for(lambda: latest_of(client, "c") == "1", 10, "the models")
        for name in ("a", "b", "c"):
            assert client.post(f"/models/{name}/predict", json={"inputs": X}).status_code == 200
            assert repository.cache.total_bytes <= 2.5 * size
        cached = sorted(path.parts[-3] for path, _, _ in repository.cache.entries())
        assert cached == ["b", "c"]
        assert repository.cache.evictions == 1
        # a was evicted from disk but is still loaded in memory, and serves.
        assert client.post("/models/a/predict", json={"inputs": X}).status_code == 200
        assert repository.downloads == 3


def test_download_progress_is_visible(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    s3.put("big/1/model.onnx", scaled_onnx_bytes(1.0, 48 * 1024 * 1024))
    server = bucket_server()
    seen: list[dict[str, Any]] = []
    with server.client() as client:
        wait_for(lambda: latest_of(client, "big") == "1", 10, "big")
        loading = threading.Thread(
            target=lambda: client.post("/admin/models/big/1/load", headers=AUTH)
        )
        loading.start()
        while loading.is_alive():
            version = client.get("/models/big").json()["versions"][0]
            if version["state"] == "downloading":
                seen.append(version)
            time.sleep(0.005)
        loading.join()
    assert seen, "the download was never visible as downloading"
    assert seen[-1]["download"]["bytes_total"] >= 48 * 1024 * 1024


def test_s3_configured_by_the_environment_alone(
    start_server: StartServer, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard way to point at MinIO or a local S3: AWS_ENDPOINT_URL and AWS_ALLOW_HTTP
    in the environment, no bucket_* setting at all."""
    upload_mlp(s3, tmp_path, 1, seed=1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("AWS_ALLOW_HTTP", "true")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    server = start_server(f"s3://{s3.bucket}", disk_cache_dir=str(tmp_path / "cache"))
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 15, "ready")
        response = client.post("/models/mlp/predict", json={"inputs": X})
        assert response.status_code == 200, response.text


def test_at_the_default_poll_interval_ready_means_servable(
    start_server: StartServer, s3: S3, tmp_path: Path
) -> None:
    """Uploaded just before start, default poll_interval_s (10 s) and settle window (1 s): no
    request after /readyz = 200 gets 503."""
    upload_mlp(s3, tmp_path, 1, seed=1)
    s3.put("m/1/model.onnx", scaled_onnx_bytes(1.0))
    server = start_server(
        f"s3://{s3.bucket}",
        bucket_endpoint=s3.url,
        bucket_allow_http=True,
        disk_cache_dir=str(tmp_path / "cache"),
        settle_window_s=1.0,
        settle_wait_s=0,
    )
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 8, "ready")
        for name in ("mlp", "m"):
            response = client.post(f"/models/{name}/predict", json={"inputs": X})
            assert response.status_code == 200, response.text


def test_objects_older_than_the_settle_window_are_complete_at_the_first_listing(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    upload_mlp(s3, tmp_path, 1, seed=1)
    uploaded = time.time()
    # S3 times have whole seconds: let the upload be more than a settle window old.
    wait_for(lambda: time.time() - uploaded > 1.2, 5, "the upload to age")
    server = bucket_server(poll_interval_s=60, settle_window_s=0.2, settle_wait_s=0)
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
    assert server.model_server.discovery.scans_done == 1  # no second listing was needed


def test_emptied_bucket_keeps_models_serving_then_serves_new_uploads(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    upload_mlp(s3, tmp_path, 1, seed=1)
    server = bucket_server(poll_interval_s=0.2, empty_grace_s=60)
    with server.client() as client:
        wait_for(lambda: latest_of(client, "mlp") == "1", 10, "mlp")
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
        s3.client.delete_object(Bucket=s3.bucket, Key="mlp/1/model.onnx")
        wait_for(lambda: client.get("/readyz").json()["status"] == "degraded", 10, "degraded")
        assert "lists no models" in client.get("/readyz").json()["reason"]
        for _ in range(10):
            assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200
        s3.put("fresh/1/model.onnx", scaled_onnx_bytes(3.0))
        s3.put("fresh/1/READY", b"")
        wait_for(
            lambda: client.post("/models/fresh/predict", json={"inputs": X}).status_code == 200,
            10,
            "the new upload",
        )
        assert client.get("/readyz").json() == {"status": "ready"}
        # The new listing is the repository now: mlp, gone from it, retires.
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 404


def test_a_bucket_unreachable_at_start_is_served_once_it_answers(
    bucket_server: Callable[..., RunningServer], s3: S3, tmp_path: Path
) -> None:
    upload_mlp(s3, tmp_path, 1, seed=1)
    s3.stop()
    server = bucket_server(poll_interval_s=0.2)
    with server.client() as client:
        wait_for(lambda: server.model_server.scanned, 20, "the first (failed) listing")
        waiting = client.get("/readyz")
        assert waiting.status_code == 503
        assert "cannot be read" in waiting.json()["reason"]
        s3.restart()
        wait_for(lambda: client.get("/readyz").status_code == 200, 30, "ready")
        assert client.post("/models/mlp/predict", json={"inputs": X}).status_code == 200


def bucket_repository(s3: S3, cache_dir: Path, settle_window_s: float = 60) -> BucketRepository:
    """The repository the server builds for an s3:// root, driven by hand: one `scan` is one
    poll of the listing."""
    from multiserve.backends import BackendRegistry
    from multiserve.repository.bucket import BucketOptions
    from multiserve.repository.disk_cache import DiskCache

    options = BucketOptions(endpoint=s3.url, region="us-east-1", allow_http=True)
    return BucketRepository(
        f"s3://{s3.bucket}",
        BackendRegistry(),
        DiskCache(cache_dir, 0),
        options,
        poll_interval_s=60,
        settle_window_s=settle_window_s,
    )


def test_a_version_is_complete_only_when_two_consecutive_listings_agree(
    s3: S3, tmp_path: Path
) -> None:
    repository = bucket_repository(s3, tmp_path / "cache")
    s3.put("m/1/model.onnx", scaled_onnx_bytes(1.0))
    [first] = repository.scan()
    assert not first.marker  # new objects, one listing: not known to be whole
    s3.put("m/1/warmup.json", b'{"inputs": [[1, 2, 3, 4]]}')
    [second] = repository.scan()
    assert not second.marker  # listed twice, but differently: still being uploaded
    [third] = repository.scan()
    assert third.marker  # the same twice in a row: complete
    assert third.fingerprint == second.fingerprint != first.fingerprint


def test_a_downloaded_version_directory_is_whole_whenever_it_exists(s3: S3, tmp_path: Path) -> None:
    """Downloads go to a temporary name and are renamed into place when complete: a watcher
    that looks at the version's directory all through the download never sees part of it."""
    repository = bucket_repository(s3, tmp_path / "cache", settle_window_s=0)
    data = scaled_onnx_bytes(1.0, 32 * 1024 * 1024)
    s3.put("m/1/model.onnx", data)
    s3.put("m/1/warmup.json", b'{"inputs": [[1, 2, 3, 4]]}')
    [record] = repository.scan()
    seen: list[tuple[int, ...]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                sizes = tuple(sorted(p.stat().st_size for p in record.path.iterdir()))
            except FileNotFoundError:
                continue  # not there (yet), or a file vanished between listing and stat
            seen.append(sizes)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert repository.materialize(record) == record.path
    finally:
        done.set()
        watcher.join(timeout=10)
    whole = tuple(sorted((len(data), len(b'{"inputs": [[1, 2, 3, 4]]}'))))
    assert set(seen) <= {whole}, sorted(set(seen))[:5]
    assert (record.path / "model.onnx").read_bytes() == data
    assert not list((tmp_path / "cache").glob(".partial-*"))


def test_a_download_cut_short_by_a_crash_is_cleaned_up_at_start(tmp_path: Path) -> None:
    from multiserve.repository.disk_cache import DiskCache

    cache = DiskCache(tmp_path / "cache", 0)
    staging = cache.staging()
    (staging / "model.onnx").write_bytes(b"half a model")
    assert cache.entries() == []  # a download in progress is no cached version
    DiskCache(tmp_path / "cache", 0)  # the next start
    assert not staging.exists()


def test_a_checksum_sidecar_in_the_bucket_is_verified(
    bucket_server: Callable[..., RunningServer], s3: S3
) -> None:
    import hashlib

    data = scaled_onnx_bytes(2.0)
    s3.put("m/1/model.onnx", data)
    s3.put("m/1/model.onnx.sha256", b"0" * 64 + b"  model.onnx\n")
    s3.put("m/1/READY", b"")
    server = bucket_server()
    with server.client() as client:

        def state() -> dict[str, Any]:
            response = client.get("/models/m")
            if response.status_code != 200:
                return {}
            found: dict[str, Any] = response.json()["versions"][0]
            return found

        wait_for(lambda: bool(state()), 10, "m in the listing")
        response = client.post("/models/m/predict", json={"inputs": X})
        assert response.status_code == 503, response.text
        assert "does not match model.onnx.sha256" in state()["error"]
        s3.put("m/1/model.onnx.sha256", hashlib.sha256(data).hexdigest().encode() + b"\n")
        wait_for(
            lambda: client.post("/models/m/predict", json={"inputs": X}).status_code == 200,
            10,
            "the verified version",
        )
