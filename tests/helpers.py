"""Small helpers the integration tests share."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The npm packages .ci/system-deps installs.
NODE_BIN = Path(__file__).resolve().parent.parent / ".ci" / "node_modules" / ".bin"


def require_tool(name: str) -> str:
    """The path of a system program a test drives (a router, a browser, an emulator).

    Missing, the test is skipped with the command that installs it, except in CI
    (``MULTISERVE_CI=1``, set by ``.ci/run`` after it installed them), where it fails.
    """
    path = shutil.which(name) or shutil.which(name, path=str(NODE_BIN))
    if path is not None:
        return path
    message = f"{name} is not installed: run `bash .ci/system-deps` (as root)"
    if os.environ.get("MULTISERVE_CI") == "1":
        pytest.fail(message)
    pytest.skip(message)


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    """The native error body, checked: the status, JSON, no traceback, a code and a message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text
    error: dict[str, str] = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["message"]
    return error


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until ``condition()``; the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - started
