"""`multiserve bundle` and `multiserve serve --bundle` as a user runs them: a bundle made from a
directory or a bucket serves from a read-only file system, and a tampered one never starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from multiserve.bundle import MANIFEST, verify_bundle
from tests.conftest import ADMIN_TOKEN
from tests.helpers import AUTH
from tests.integration.test_bucket import S3
from tests.integration.test_cli import free_port

X = {"inputs": [[1.0, 2.0, 3.0, 4.0]]}


def multiserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multiserve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def read_only(path: Path, command: list[str]) -> list[str]:
    """``command`` run with ``path`` read-only for it. As root (as in CI), permissions do not
    stop writes, so the path is bind-mounted read-only in a mount namespace of its own."""
    if os.geteuid() != 0:
        for item in [path, *path.rglob("*")]:
            item.chmod(item.stat().st_mode & ~0o222)
        return command
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed to test a read-only bundle"
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    isolate = [unshare, "--mount", "--propagation", "private"]
    return [*isolate, "sh", "-c", script, str(path), *command]


class Served:
    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "MULTISERVE_ADMIN_TOKEN": ADMIN_TOKEN, **env},
        )
        self.output = ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.stop()}")
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.terminate()
        self.output += self.process.communicate(timeout=30)[0]
        return self.output


@pytest.fixture
def served() -> Iterator[list[Served]]:
    running: list[Served] = []
    yield running
    for server in running:
        server.stop()


def serve_bundle(
    running: list[Served], bundle: Path, env: dict[str, str], *, read_only_dir: bool
) -> Served:
    command = [sys.executable, "-m", "multiserve", "serve", "--bundle", str(bundle)]
    if read_only_dir:
        command = read_only(bundle, command)
    server = Served(command, env)
    running.append(server)
    return server


def test_a_bundle_serves_from_a_read_only_directory_and_keeps_pins_outside_it(
    model_repo: Path, tmp_path: Path, served: list[Served]
) -> None:
    bundle = tmp_path / "bundle"
    # ONNX models only: no torch import at each start.
    only = ["--only", "mlp", "--only", "adder", "--only", "counter"]
    made = multiserve("bundle", "--models", str(model_repo), "--out", str(bundle), *only)
    assert made.returncode == 0, made.stderr
    assert f"multiserve serve --bundle {bundle}" in made.stdout
    before = {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    env = {"HOME": str(tmp_path / "home")}

    server = serve_bundle(served, bundle, env, read_only_dir=True)
    server.wait_ready()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post("/models/mlp/predict", json=X)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "2"
        assert client.get("/models/mlp").json()["latest"] == "2"
        assert client.get("/models/mlp/1").status_code == 404  # version 1 was not bundled
        # Pins and labels are saved outside the (read-only) bundle, in the user's cache.
        assert client.post("/admin/models/adder/1/pin", headers=AUTH).status_code == 200
        labelled = client.put(
            "/admin/models/mlp/labels/stable", headers=AUTH, json={"version": "2"}
        )
        assert labelled.status_code == 200, labelled.text
    output = server.stop()
    assert "match their checksums" in output
    assert server.process.returncode in (0, -15), output
    saved = list((tmp_path / "home" / ".cache" / "multiserve" / "bundles").rglob("state.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["pins"] == [{"name": "adder", "version": 1}]
    # Nothing was written into the bundle: it still verifies, byte for byte.
    assert {p: p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == before
    verify_bundle(bundle)

    # The pin survives a restart of the same bundle.
    again = serve_bundle(served, bundle, env, read_only_dir=True)
    again.wait_ready()
    with httpx.Client(base_url=again.url, timeout=30) as client:
        cache = client.get("/admin/cache", headers=AUTH).json()
        assert any(e["name"] == "adder" and e["pinned"] for e in cache["entries"]), cache


@pytest.mark.parametrize("tamper", ["changed byte", "missing file", "extra file"])
def test_a_tampered_bundle_never_starts(
    model_repo: Path, tmp_path: Path, served: list[Served], tamper: str
) -> None:
    bundle = tmp_path / "bundle"
    assert multiserve("bundle", "--models", str(model_repo), "--out", str(bundle)).returncode == 0
    artifact = bundle / "models/mlp/2/model.onnx"
    if tamper == "changed byte":
        data = bytearray(artifact.read_bytes())
        data[-1] ^= 0xFF
        artifact.write_bytes(bytes(data))
        named = "models/mlp/2/model.onnx"
    elif tamper == "missing file":
        artifact.unlink()
        named = "models/mlp/2/model.onnx"
    else:
        (bundle / "models/mlp/2/warmup.json").write_text('{"inputs": [[0, 0, 0, 0]]}')
        named = "models/mlp/2/warmup.json"
    server = serve_bundle(served, bundle, {}, read_only_dir=False)
    assert server.process.wait(timeout=60) == 2
    output = server.stop()
    assert named in output
    assert "checksum" in output
    assert "Traceback" not in output
    assert "Uvicorn running" not in output  # it never listened, so it never reported ready


def test_bundle_and_serve_refuse_bad_arguments(model_repo: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert multiserve("bundle", "--models", str(model_repo), "--out", str(bundle)).returncode == 0
    both = multiserve("serve", "--bundle", str(bundle), "--models", str(model_repo))
    assert both.returncode == 2
    assert "--bundle brings its own models and config" in both.stderr
    again = multiserve("bundle", "--models", str(model_repo), "--out", str(bundle))
    assert again.returncode == 2
    assert "exists and is not empty" in again.stderr
    missing = multiserve("serve", "--bundle", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "no manifest.json" in missing.stderr
    wrong = multiserve(
        "bundle", "--models", str(model_repo), "--out", str(tmp_path / "x"), "--only", "mlp:9"
    )
    assert wrong.returncode == 2
    assert "mlp has no version 9" in wrong.stderr
    for result in (both, again, missing, wrong):
        assert "Traceback" not in result.stderr


def test_a_bundle_made_from_a_bucket_serves_the_bucket_versions(
    tmp_path: Path, served: list[Served], monkeypatch: pytest.MonkeyPatch, model_repo: Path
) -> None:
    credentials = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key, value in credentials.items():
        monkeypatch.setenv(key, value)
    s3 = S3("bundle-source")
    try:
        s3.client.create_bucket(Bucket=s3.bucket)
        for path in model_repo.rglob("*"):
            if path.is_file() and path.parts[-3:-1] != ("mlp", "2"):
                s3.put(path.relative_to(model_repo).as_posix(), path.read_bytes())
        s3.put("mlp/config.toml", b"inference_threads = 2\n")
        bundle = tmp_path / "bundle"
        made = multiserve(
            "bundle",
            "--models",
            f"s3://{s3.bucket}",
            "--bucket-endpoint",
            s3.url,
            "--bucket-allow-http",
            "--out",
            str(bundle),
            "--only",
            "mlp",
            "--only",
            "adder:1",
        )
    finally:
        s3.stop()
    assert made.returncode == 0, made.stderr
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["source"] == "s3://bundle-source"
    assert [(m["name"], m["version"]) for m in manifest["models"]] == [("adder", 1), ("mlp", 1)]
    assert (bundle / "models/mlp/1/model.onnx").read_bytes() == (
        model_repo / "mlp/1/model.onnx"
    ).read_bytes()
    assert (bundle / "models/mlp/config.toml").read_bytes() == b"inference_threads = 2\n"
    assert not (bundle / ".downloads").exists()
    # The bucket is gone; the bundle serves on its own.
    server = serve_bundle(served, bundle, {"HOME": str(tmp_path / "home")}, read_only_dir=True)
    server.wait_ready()
    answer = httpx.post(f"{server.url}/models/mlp/predict", json=X, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model_version"] == "1"
