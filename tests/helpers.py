"""Small helpers the integration tests share."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.conftest import ADMIN_TOKEN

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


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
