"""The real ``multiserve serve`` process (issue 12): exit status 0 after a drain on SIGTERM or
SIGINT, a second signal exits at once, requests still running at the deadline get a JSON 503
(and a fractional deadline is honoured), the connection cap answers 503, and a state file
that cannot be read stops the start with a clear message."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

PREDICTOR = """
import time


class Predictor:
    def __init__(self, model_dir, config):
        pass

    def predict(self, payload):
        time.sleep(float(payload.get("sleep", 0)))
        return {"slept": payload.get("sleep", 0)}
"""


@pytest.fixture
def sleepy(tmp_path: Path) -> Path:
    """A repository with one Python predictor that sleeps as long as it is asked to."""
    version = tmp_path / "models" / "sleepy" / "1"
    version.mkdir(parents=True)
    (version / "predictor.py").write_text(PREDICTOR)
    return tmp_path / "models"


class Serve:
    def __init__(self, models: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "multiserve",
                "serve",
                "--models",
                str(models),
                "--port",
                str(self.port),
                "--grpc-port",
                "0",
                "--settle-window-s",
                "0",
                "--allow-python-predictors",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def ready(self) -> Serve:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.process.communicate()[0]
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)

    def sleep(self, seconds: float) -> httpx.Response:
        return httpx.post(
            self.url + "/models/sleepy/1/predict", json={"sleep": seconds}, timeout=60
        )

    def wait(self, timeout: float) -> tuple[int, str]:
        output = self.process.communicate(timeout=timeout)[0]
        return self.process.returncode, output

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture
def serve() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for server in started:
        server.kill()


def running(pool: ThreadPoolExecutor, server: Serve, seconds: float) -> Future[httpx.Response]:
    future = pool.submit(server.sleep, seconds)
    time.sleep(0.5)  # it has started
    return future


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_drained_shutdown_exits_0_and_running_requests_finish(
    serve: list[Serve], sleepy: Path, sig: signal.Signals
) -> None:
    server = Serve(sleepy)
    serve.append(server)
    server.ready()
    assert server.sleep(0).status_code == 200  # loaded
    with ThreadPoolExecutor(3) as pool:
        requests = [running(pool, server, 1.5) for _ in range(1)]
        os.kill(server.process.pid, sig)
        assert [r.result().status_code for r in requests] == [200]
    status, output = server.wait(30)
    assert status == 0, output
    assert "Application shutdown complete" in output


def test_a_second_signal_exits_at_once(serve: list[Serve], sleepy: Path) -> None:
    server = Serve(sleepy, "--shutdown-timeout-s", "60")
    serve.append(server)
    server.ready()
    assert server.sleep(0).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        request = running(pool, server, 20)
        os.kill(server.process.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None  # draining: waiting for the request
        os.kill(server.process.pid, signal.SIGTERM)
        started = time.monotonic()
        status, output = server.wait(10)
        assert time.monotonic() - started < 5
        with contextlib.suppress(httpx.TransportError):  # else answered 503 as the loop closed
            assert request.result().status_code == 503
    assert status == 1, output
    assert "second signal" in output


def test_requests_running_at_the_deadline_get_a_json_503_after_a_fractional_wait(
    serve: list[Serve], sleepy: Path
) -> None:
    server = Serve(sleepy, "--shutdown-timeout-s", "0.9")
    serve.append(server)
    server.ready()
    assert server.sleep(0).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        request = running(pool, server, 10)
        signalled = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        response = request.result()
        waited = time.monotonic() - signalled
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "shutting_down"
    assert 0.8 <= waited < 5  # 0.9 s honoured, not truncated to 0
    status, output = server.wait(30)
    assert status == 0, output


def test_connections_past_max_connections_get_503(serve: list[Serve], sleepy: Path) -> None:
    server = Serve(sleepy, "--max-connections", "4")
    serve.append(server)
    server.ready()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        response = httpx.get(server.url + "/healthz")
        assert response.status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_an_unreadable_state_file_stops_the_start_with_a_clear_message(
    sleepy: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    (state / "state.json").mkdir(parents=True)  # unreadable as a file, even for root
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "multiserve",
            "serve",
            "--models",
            str(sleepy),
            "--state-dir",
            str(state),
            "--port",
            str(free_port()),
            "--grpc-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "cannot read the state file" in result.stderr
    assert "Traceback" not in result.stderr
    assert (state / "state.json").is_dir()  # kept as it was
