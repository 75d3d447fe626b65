"""`multiserve serve` as an operator runs it: what its settings promise, seen from outside the
process (its log, its answers, how long it takes to stop), and that an ONNX-only repository
never imports torch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from examples.make_models import scaled_onnx_bytes
from tests.conftest import free_port
from tests.helpers import wait_for

SLOW_PREDICTOR = """
import time
from pathlib import Path


class Predictor:
    def __init__(self, model_dir, config):
        pass

    def predict(self, payload):
        Path(payload["started"]).touch()
        time.sleep(float(payload["seconds"]))
        return {"slept": payload["seconds"]}
"""


class Serving:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.process = process
        self.log = log
        self.url = url

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serving]:
    """`multiserve serve` in a child process on a repository of one ONNX model and one slow
    Python predictor, with the access log on, a drain of 1 s, and no admin token set."""
    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(3.0))
    (root / "slow" / "1").mkdir(parents=True)
    (root / "slow" / "1" / "predictor.py").write_text(SLOW_PREDICTOR)
    port = free_port()
    log = tmp_path / "serve.log"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MULTISERVE_")}
    environ |= {"MULTISERVE_ACCESS_LOG": "true", "MULTISERVE_SHUTDOWN_TIMEOUT_S": "1"}
    with log.open("wb") as stream:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "multiserve", "serve", "--models", str(root)),
                *("--port", str(port), "--grpc-port", "0", "--allow-python-predictors"),
                *("--settle-window-s", "0"),
            ],
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=environ,
        )
    serving = Serving(process, log, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert process.poll() is None, serving.output()
        try:
            return httpx.get(f"{serving.url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 60, "the server to be ready")
        yield serving
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_generated_admin_token_is_logged_once_and_access_log_lines_are_written(
    serve: Serving,
) -> None:
    tokens = re.findall(r"admin token \(generated[^)]*\): (\S+)", serve.output())
    assert len(tokens) == 1, serve.output()
    token = tokens[0]
    with httpx.Client(base_url=serve.url, timeout=30) as client:
        assert client.get("/admin/cache", headers={"Authorization": "Bearer nope"}).status_code == (
            401
        )
        assert (
            client.get("/admin/cache", headers={"Authorization": f"Bearer {token}"}).status_code
            == 200
        )
        answer = client.post("/models/m/predict", json={"inputs": [[1, 2, 3, 4]]})
        assert answer.json()["outputs"]["y"] == [[3.0, 6.0, 9.0, 12.0]]
    # access_log = true: one line per request, as uvicorn writes it.
    wait_for(
        lambda: '"POST /models/m/predict HTTP/1.1" 200' in serve.output(), 10, "the access log"
    )
    assert serve.output().count(token) == 1  # logged once, and never again


def test_sigterm_gives_running_requests_shutdown_timeout_s_then_exits(
    serve: Serving, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    answers: list[int | str] = []

    def slow_request() -> None:
        try:
            response = httpx.post(
                f"{serve.url}/models/slow/predict",
                json={"started": str(started), "seconds": 60},
                timeout=90,
            )
            answers.append(response.status_code)
        except httpx.TransportError as exc:
            answers.append(type(exc).__name__)

    request = threading.Thread(target=slow_request)
    request.start()
    wait_for(started.exists, 30, "the slow request to run")
    stopping = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    # shutdown_timeout_s is 1: the process is gone long before the request's 60 s. The bound
    # (30 s) leaves a noisy 2-core machine 29 s for the drain and the exit; without the
    # timeout the server would wait the whole 60 s for the request.
    serve.process.wait(timeout=30)
    assert time.monotonic() - stopping < 30
    assert serve.process.returncode in (0, -signal.SIGTERM), serve.output()
    request.join(timeout=30)
    assert answers, "the slow request never ended"
    assert answers[0] != 200, answers


def test_an_onnx_only_repository_never_imports_torch(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0))
    # A fresh interpreter (this one has imported torch for other tests): it serves the
    # repository, answers a request, then says which runtimes it imported.
    code = f"""
import sys, httpx
from tests.conftest import RunningServer
from multiserve.settings import Settings
settings = Settings.load(environ={{}}, overrides={{
    "models": {str(tmp_path)!r}, "settle_window_s": 0, "grpc_port": 0}})
server = RunningServer(settings).start()
try:
    with server.client() as client:
        deadline = __import__("time").monotonic() + 60
        while client.get("/readyz").status_code != 200:
            assert __import__("time").monotonic() < deadline
        answer = client.post("/models/m/predict", json={{"inputs": [[1, 2, 3, 4]]}})
        assert answer.json()["outputs"]["y"] == [[2.0, 4.0, 6.0, 8.0]], answer.text
finally:
    server.stop()
print(sorted(m for m in ("torch", "multiserve_torch", "onnxruntime") if m in sys.modules))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "['onnxruntime']"
