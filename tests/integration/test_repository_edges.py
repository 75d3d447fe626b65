"""The repository's edges: symbolic links out of it, directories that cannot be read."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import tempfile
import threading
from pathlib import Path

from examples.make_models import scaled_onnx_bytes
from multiserve.backends import BackendRegistry
from multiserve.repository.local import LocalRepository
from tests.conftest import StartServer
from tests.helpers import wait_for

X = [[1.0, 2.0, 3.0, 4.0]]


def version_of(client_json: dict[str, object], version: str) -> dict[str, object]:
    versions = client_json["versions"]
    assert isinstance(versions, list)
    found: dict[str, object] = next(v for v in versions if v["version"] == version)
    return found


def test_symlink_out_of_the_repository_is_refused_and_one_inside_is_served(
    start_server: StartServer, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "model.onnx"
    outside.parent.mkdir()
    outside.write_bytes(scaled_onnx_bytes(9.0))
    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").symlink_to(outside)
    # As Kubernetes mounts a volume: the files live in a hidden directory, linked into place.
    (root / "..data" / "inside").mkdir(parents=True)
    (root / "..data" / "inside" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
    (root / "k" / "1").mkdir(parents=True)
    (root / "k" / "1" / "model.onnx").symlink_to(root / "..data" / "inside" / "model.onnx")
    server = start_server(root)
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
        refused = client.post("/models/m/1/predict", json={"inputs": X})
        assert refused.status_code == 503
        version = version_of(client.get("/models/m").json(), "1")
        assert version["state"] == "failed"
        error = str(version["error"])
        assert "model.onnx is a symbolic link to" in error
        assert "outside the repository" in error
        assert "allow_external_symlinks" in error
        inside = client.post("/models/k/predict", json={"inputs": X})
        assert inside.status_code == 200, inside.text
        assert inside.json()["outputs"]["y"] == [[2.0, 4.0, 6.0, 8.0]]


def test_symlinks_out_of_the_repository_are_served_when_allowed(
    start_server: StartServer, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere" / "model.onnx"
    outside.parent.mkdir()
    outside.write_bytes(scaled_onnx_bytes(9.0))
    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").symlink_to(outside)
    server = start_server(root, allow_external_symlinks=True)
    with server.client() as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, 10, "ready")
        response = client.post("/models/m/predict", json={"inputs": X})
        assert response.status_code == 200, response.text


def scan_as_nobody(root: Path) -> dict[str, str | None]:
    """Scan ``root`` with a real user's permissions. As root (as CI runs), in a thread whose
    file-system user is nobody: Linux keeps that per thread, and drops root's override of
    file permissions with it."""
    found: dict[str, str | None] = {}
    failure: list[BaseException] = []

    def scan() -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if os.geteuid() == 0:
            libc.setfsuid(65534)
            if libc.setfsuid(-1) != 65534:  # setfsuid reports the previous value
                failure.append(OSError("setfsuid did not take"))
                return
        try:
            for record in LocalRepository(root, BackendRegistry()).scan():
                found[f"{record.name}/{record.version}"] = record.problem
        except BaseException as exc:
            failure.append(exc)
        finally:
            if os.geteuid() == 0:
                libc.setfsuid(0)

    thread = threading.Thread(target=scan)
    thread.start()
    thread.join(timeout=60)
    if failure:
        raise failure[0]
    return found


def test_an_unreadable_version_directory_is_named_as_such() -> None:
    base = Path(tempfile.mkdtemp(prefix="multiserve-perm-"))  # reachable by nobody
    try:
        os.chmod(base, 0o755)
        root = base / "models"
        for version in ("1", "2"):
            (root / "m" / version).mkdir(parents=True)
            (root / "m" / version / "model.onnx").write_bytes(scaled_onnx_bytes(1.0))
        os.chmod(root / "m" / "2", 0o000)
        problems = scan_as_nobody(root)
        assert problems["m/1"] is None
        assert "m version 2: its directory cannot be read" in str(problems["m/2"])
        assert "Permission denied" in str(problems["m/2"])
        assert "config.toml" not in str(problems["m/2"])
    finally:
        for path in base.rglob("*"):
            os.chmod(path, 0o755)
        shutil.rmtree(base, ignore_errors=True)
