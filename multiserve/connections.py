"""The HTTP server around the app: connection bounds, and a shutdown that supervisors read as
clean.

- ``max_connections`` becomes uvicorn's ``limit_concurrency``: past it a new connection's
  request is answered 503 (uvicorn's own, plain text) instead of exhausting file descriptors;
  the process's open-file limit is raised to its hard limit at start, so the cap, not the
  limit, is what a crowd of clients meets.
- ``keepalive_timeout_s`` closes idle keep-alive connections. Slow clients that send their
  headers a byte at a time are the reverse proxy's to cut off (``timeout http-request`` in
  deploy/router/haproxy.cfg): uvicorn has no header-read timeout.
- `Server` drains on SIGTERM or SIGINT within ``shutdown_timeout_s`` (fractions honoured),
  then exits with status 0; uvicorn's own re-raises the signal after draining, and the
  process dies with 143, which supervisors and ``make`` report as a failure. A second signal
  stops the wait at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import uvicorn

from multiserve.settings import Settings

logger = logging.getLogger("multiserve.connections")

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        logger.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        return soft
    return hard


def uvicorn_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration for ``app`` under ``settings`` (``options`` added or
    overriding, as tests set their own sockets and logging)."""
    config: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "log_level": settings.log_level,
        "access_log": settings.access_log,
        "limit_concurrency": settings.max_connections or None,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        # A float: uvicorn waits with asyncio.wait_for, which takes fractions.
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
    }
    config.update(options)
    return uvicorn.Config(app, **config)


class Server(uvicorn.Server):
    """uvicorn's server, with the shutdown described in the module docstring."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.signals: list[int] = []

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals.append(sig)
        if self.should_exit:
            logger.warning("second signal: exiting without waiting for running requests")
            self.force_exit = True
        else:
            logger.info(
                "signal %s: draining (at most %g s)",
                signal.Signals(sig).name,
                self.config.timeout_graceful_shutdown or 0,
            )
            self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Signals can only be listened to from the main thread (tests run servers in others).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
        # Unlike uvicorn's: the signal is not raised again. A drained shutdown is a clean exit.
