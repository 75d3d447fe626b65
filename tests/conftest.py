from __future__ import annotations

import dataclasses
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from examples.make_models import write_examples
from multiserve.backends import BackendRegistry
from multiserve.http import create_app
from multiserve.server import ModelServer
from multiserve.settings import Settings
from tests.npz_backend import ENTRY_POINT as NPZ_ENTRY_POINT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def example_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled example repository, built once per test session. Treat it as read-only."""
    root = tmp_path_factory.mktemp("examples")
    write_examples(root)
    return root


@pytest.fixture
def model_repo(example_models: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the example repository."""
    root = tmp_path / "models"
    shutil.copytree(example_models, root)
    return root


def free_port() -> int:
    """A port nothing listens on now (the OS's pick for a socket bound and closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RunningServer:
    """A real uvicorn server on 127.0.0.1 with a free port, in a background thread, and its
    gRPC server on another free port (unless the settings turn gRPC off with grpc_port 0)."""

    def __init__(self, settings: Settings, registry: BackendRegistry | None = None) -> None:
        if settings.grpc_port:
            settings = dataclasses.replace(settings, grpc_port=free_port())
        self.grpc_target = f"127.0.0.1:{settings.grpc_port}"
        self.model_server = ModelServer(settings, registry)
        self.app = create_app(self.model_server)
        config = uvicorn.Config(self.app, log_config=None, lifespan="on", access_log=False)
        self._uvicorn = uvicorn.Server(config)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    def start(self) -> RunningServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._uvicorn.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30)

    def stop(self) -> None:
        self._uvicorn.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


StartServer = Callable[..., RunningServer]
ADMIN_TOKEN = "test-admin-token"


@pytest.fixture
def start_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Start servers on a repository; each is stopped at the end of the test."""
    servers: list[RunningServer] = []
    # Derived models and load caches go to a test's own directory, never ~/.cache.
    derived = str(tmp_path_factory.mktemp("derived"))

    def start(
        models: Path, registry: BackendRegistry | None = None, **settings: object
    ) -> RunningServer:
        if registry is None:
            registry = BackendRegistry()
        # Tests write their models just before starting; lifecycle tests set their own window.
        settings = {
            "settle_window_s": 0,
            "admin_token": ADMIN_TOKEN,
            "optimize_cache_dir": derived,
            **settings,
        }
        loaded = Settings.load(environ={}, overrides={"models": str(models), **settings})
        server = RunningServer(loaded, registry).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def npz_registry() -> BackendRegistry:
    """The installed backends plus the tests' third-party ``npz`` backend."""
    from importlib.metadata import entry_points

    return BackendRegistry([*entry_points(group="multiserve.backends"), NPZ_ENTRY_POINT])


@pytest.fixture
def client(start_server: StartServer, example_models: Path) -> Iterator[httpx.Client]:
    """A client of a server on the example models."""
    with start_server(example_models).client() as client:
        yield client
