"""The command line: `multiserve serve` and `python -m multiserve` as a user runs them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multiserve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_serve_answers_and_stops_cleanly_on_sigterm(example_models: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "multiserve",
            "serve",
            "--models",
            str(example_models),
            "--port",
            str(port),
            "--grpc-port",
            str(free_port()),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        response = httpx.post(
            f"http://127.0.0.1:{port}/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]}
        )
        assert response.status_code == 200
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    # A drained shutdown is a clean exit (multiserve.connections.Server).
    assert process.returncode == 0, output
    assert "Application shutdown complete" in output
    assert "loaded mlp version 2" in output


def test_settings_from_env_and_flags(example_models: Path) -> None:
    result = run_cli(
        "serve", "--models", str(example_models), env={"MULTISERVE_PORT": "not-a-port"}
    )
    assert result.returncode == 2
    assert "MULTISERVE_PORT" in result.stderr
    assert "expected an integer from 0 to 65535" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-request-bytes", "lots"], "--max-request-bytes"),
        (["--log-level", "loud"], "expected one of critical, error, warning, info, debug"),
        (["--device", "tpu"], "expected 'cpu', 'cuda' or 'cuda:N'"),
        (["--worker-threads", "0"], "--worker-threads"),
        (["--config", "/nonexistent/multiserve.toml"], "/nonexistent/multiserve.toml"),
    ],
)
def test_invalid_settings_stop_start_up_naming_the_key(
    example_models: Path, args: list[str], fragment: str
) -> None:
    result = run_cli("serve", "--models", str(example_models), *args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_repository_stops_start_up(tmp_path: Path) -> None:
    result = run_cli("serve", "--models", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "is not a directory" in result.stderr
    result = run_cli("serve", env={"MULTISERVE_MODELS": ""})
    assert result.returncode == 2
    assert "--models" in result.stderr


def test_importing_the_core_imports_no_backend() -> None:
    code = (
        "import sys, multiserve, multiserve.server, multiserve.http, multiserve.cli\n"
        "backends = ('torch', 'onnxruntime', 'multiserve_onnx', 'multiserve_torch')\n"
        "print(sorted(m for m in backends if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
