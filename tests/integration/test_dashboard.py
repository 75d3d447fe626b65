"""The dashboard in a real browser: Debian's chromium, driven by Selenium through
chromium-driver. What the page shows after traffic, drift and a hot swap."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from examples.make_models import write_adder_onnx, write_mlp_onnx
from multiserve.http.monitoring import PAGE
from tests.conftest import ADMIN_TOKEN, StartServer
from tests.helpers import AUTH, require_tool, wait_for

FEATURES = 4


def test_the_page_is_self_contained_and_uses_relative_urls() -> None:
    page = PAGE.decode()
    # Nothing fetched from elsewhere (no CDN), nothing from an absolute path (a path prefix
    # in front of the server must keep working).
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|/)""", page)
    assert re.findall(r"https?://[^\s\"']+", page) == ["http://www.w3.org/2000/svg"]
    assert 'const STATUS_URL = "status";' in page
    assert "admin" not in page.lower()


@pytest.fixture
def browser() -> Iterator[object]:
    chromium = require_tool("chromium")
    driver_path = require_tool("chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    options.add_argument("--disable-dev-shm-usage")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _send(client: httpx.Client, rows: np.ndarray) -> None:
    for start in range(0, len(rows), 20):
        response = client.post(
            "/models/mlp/predict", json={"inputs": {"x": rows[start : start + 20].tolist()}}
        )
        assert response.status_code == 200, response.text


def test_dashboard_shows_traffic_drift_and_a_hot_swap(
    browser: object, start_server: StartServer, tmp_path: Path
) -> None:
    from selenium.webdriver.remote.webdriver import WebDriver

    assert isinstance(browser, WebDriver)
    repo = tmp_path / "models"
    write_mlp_onnx(repo / "mlp" / "1" / "model.onnx", seed=1)
    write_adder_onnx(repo / "adder" / "1" / "model.onnx")
    server = start_server(
        repo, drift_window=200, drift_reference_rows=200, max_models=4, version_policy="all"
    )
    server.model_server.history.interval_s = 0.3
    rng = np.random.default_rng(20)

    # The page redraws on every refresh: read it in one script call, never through element
    # handles that the next redraw makes stale.
    def shown(selector: str = "body") -> str:
        script = "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';"
        return str(browser.execute_script(script, selector))

    def text() -> str:
        return shown()

    def row(version: str) -> str:
        return shown(f'tr[data-model="mlp"][data-version="{version}"]')

    with server.client() as client:
        browser.get(server.url + "/dashboard?refresh_ms=250")
        loaded = "return document.body.dataset.loaded === 'true';"
        wait_for(lambda: bool(browser.execute_script(loaded)), 15, "the first refresh")
        assert "ready" in shown("#server")
        assert "repository ok" in shown("#repository")
        assert "available" in row("1")
        # Traffic: the reference rows, then rows whose second feature moved by 2 sd.
        _send(client, rng.normal(size=(200, FEATURES)))
        shifted = rng.normal(size=(200, FEATURES))
        shifted[:, 1] += 2.0
        _send(client, shifted)
        wait_for(lambda: "DRIFTING" in row("1"), 15, "the drift flag")
        assert "x[1]" in row("1")
        assert "ready" in row("1")
        wait_for(lambda: "req/s" in shown("#traffic"), 15, "a chart")
        assert "p99" in shown('.chart[data-model="mlp"]')
        svgs = "return document.querySelectorAll('.chart[data-model=\"mlp\"] svg').length;"
        assert browser.execute_script(svgs) == 3
        assert "Models loaded: 1 of 4" in shown("#cache")
        for _ in range(30):
            pair = {"a": [[1, 2, 3]], "b": [[4, 5, 6]]}
            assert client.post("/models/adder/predict", json={"inputs": pair}).status_code == 200
        # A hot swap: version 2 appears, loads while 1 serves, and takes over.
        write_mlp_onnx(repo / "mlp" / "2" / "model.onnx", seed=2)
        wait_for(lambda: "latest" in row("2") and "ready" in row("2"), 30, "the swap on the page")
        events = shown("#events")
        assert "swapped mlp" in events
        assert "loaded mlp" in events
        _send(client, rng.normal(size=(20, FEATURES)))
        assert client.get("/models/mlp").json()["latest"] == "2"
        wait_for(lambda: "Models loaded: 3 of 4" in text(), 15, "both versions and adder")
        assert "DRIFTING" in row("1")  # the old version keeps its statistics while loaded
        screenshot = os.environ.get("MULTISERVE_DASHBOARD_PNG")
        if screenshot:  # docs/dashboard.png: a few seconds of traffic first, for the charts
            pair = {"a": [[1, 2, 3]], "b": [[4, 5, 6]]}
            started = time.monotonic()
            while time.monotonic() - started < 4:
                _send(client, rng.normal(size=(20 * (int(time.monotonic()) % 3 + 1), FEATURES)))
                client.post("/models/adder/predict", json={"inputs": pair})
            browser.save_screenshot(screenshot)
        evicted = client.post("/admin/models/mlp/1/evict", headers=AUTH)
        assert evicted.status_code == 200
        wait_for(lambda: "evicted mlp (admin)" in text(), 15, "the eviction of 1")
        wait_for(lambda: "DRIFTING" not in row("1"), 15, "no statistics once unloaded")
        assert ADMIN_TOKEN not in browser.page_source


def test_dashboard_is_served_at_the_root_too(start_server: StartServer, tmp_path: Path) -> None:
    write_mlp_onnx(tmp_path / "models" / "mlp" / "1" / "model.onnx", seed=1)
    with start_server(tmp_path / "models").client() as client:
        for path in ("/", "/dashboard"):
            response = client.get(path)
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/html; charset=utf-8"
            assert "connect-src 'self'" in response.headers["content-security-policy"]
            assert response.content == PAGE
        assert client.post("/dashboard").status_code == 405
        status = client.get("/status")
        assert ADMIN_TOKEN not in status.text


def test_dashboard_works_behind_a_path_prefix(
    browser: object, start_server: StartServer, tmp_path: Path
) -> None:
    """A reverse proxy serves the server under /team-a/ (and strips the prefix): the page's
    relative URLs reach /team-a/status, through the proxy, not the proxy's own /status."""
    import socket
    import threading

    import uvicorn
    from selenium.webdriver.remote.webdriver import WebDriver
    from starlette.types import Receive, Scope, Send

    assert isinstance(browser, WebDriver)
    write_mlp_onnx(tmp_path / "models" / "mlp" / "1" / "model.onnx", seed=1)
    server = start_server(tmp_path / "models")
    seen: list[str] = []

    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            seen.append(scope["path"])
            if not scope["path"].startswith("/team-a/"):
                await send({"type": "http.response.start", "status": 404, "headers": []})
                await send({"type": "http.response.body", "body": b"not behind the prefix"})
                return
            path = scope["path"].removeprefix("/team-a")
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await server.app(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    proxy_server = uvicorn.Server(uvicorn.Config(proxy, lifespan="off", log_config=None))
    thread = threading.Thread(target=proxy_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: proxy_server.started, 10, "the proxy")
        browser.get(f"http://127.0.0.1:{sock.getsockname()[1]}/team-a/dashboard")
        loaded = "return document.body.dataset.loaded === 'true';"
        wait_for(lambda: bool(browser.execute_script(loaded)), 15, "the page's first refresh")
        assert "/team-a/status" in seen
        assert "/status" not in seen
    finally:
        proxy_server.should_exit = True
        thread.join(10)
        sock.close()
