"""A predictor run in a child process of its own (``isolation = "process"``).

The child is a fresh interpreter (``python -m multiserve_python.child``, not a fork of the
server, whose threads and runtimes a fork would copy half-way), connected by a socket pair. It
constructs the predictor and answers one message at a time. If it dies (a segfault,
``os._exit``, the kernel's OOM killer, which prefers it to the server), the requests it was
answering get 503, the server and every other model go on, and the next request starts a new
child: at once after a first crash, then after a backoff that doubles with each crash in a row
(up to `BACKOFF_MAX_S`). Closing the model ends the child, so its memory goes back in full.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from multiserve.types import (
    MalformedRequest,
    ModelLoadFailed,
    ModelMetadata,
    ModelUnavailable,
    MultiserveError,
    PayloadRequest,
    PredictionFailed,
    Reply,
)
from multiserve_python import contract

logger = logging.getLogger("multiserve.python")

NO_TENSORS = ModelMetadata(inputs=(), outputs=())
BACKOFF_FIRST_S = 1.0  # after the second crash in a row; the first restarts at once
BACKOFF_MAX_S = 30.0
CLOSE_TIMEOUT_S = 10.0  # for the predictor's close() before its process is killed
_ERRORS: dict[str, type[MultiserveError]] = {
    "malformed_request": MalformedRequest,
    "prediction_failed": PredictionFailed,
}


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What a child needs to construct the predictor (sent to it when it starts)."""

    version_dir: Path
    config: Mapping[str, Any]
    class_name: str | None
    label: str
    memory_limit: int  # bytes of data segment (RLIMIT_DATA); 0: no limit
    timeout_s: float  # for one answer
    start_timeout_s: float  # for the import and __init__

    def message(self) -> dict[str, Any]:
        return {
            "version_dir": str(self.version_dir),
            "config": dict(self.config),
            "class_name": self.class_name,
            "label": self.label,
            "memory_limit": self.memory_limit,
            "log_level": logging.getLogger().getEffectiveLevel(),
        }


class PredictorProcess:
    """The child process of one loaded version, started again after it dies. One exchange
    at a time (the model's worker thread(s) queue on a lock)."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._connection: Connection | None = None
        self._closed = False
        self.restarts = 0
        self.crashes = 0  # in a row: reset by an answer
        self.last_exit: str | None = None
        self._retry_at = 0.0
        self.info: dict[str, Any] = {}

    # --- starting ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the child and construct the predictor: ModelLoadFailed if it cannot."""
        with self._lock:
            self._spawn()

    def _spawn(self) -> None:
        parent_end, child_end = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "multiserve_python.child", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            parent_end.close()
            raise ModelLoadFailed(f"cannot start a predictor process: {exc}") from exc
        finally:
            child_end.close()
        connection = Connection(parent_end.detach())
        try:
            connection.send(("init", self.spec.message()))
            if not connection.poll(self.spec.start_timeout_s):
                raise ModelLoadFailed(
                    f"the predictor did not start within start_timeout_s = "
                    f"{self.spec.start_timeout_s:g} s"
                )
            kind, detail = connection.recv()
        except (EOFError, OSError):
            connection.close()
            raise ModelLoadFailed(
                f"its process {_exit_text(_reap(process))} while starting"
            ) from None
        except BaseException:
            connection.close()
            _reap(process, kill=True)
            raise
        if kind != "ready":
            connection.close()
            _reap(process)
            raise ModelLoadFailed(str(detail))
        self.info = dict(detail)
        self._process, self._connection = process, connection
        logger.info("%s: predictor process %d started", self.spec.label, process.pid)

    def _running(self) -> Connection:
        """The connection to a live child, starting one if the last died (under the lock)."""
        process = self._process
        if self._closed:
            raise ModelUnavailable("it is closed")
        if process is not None and process.poll() is None and self._connection is not None:
            return self._connection
        if process is not None:  # died while idle: the OOM killer, a signal from outside
            self._crashed(_exit_text(_reap(process)))
        wait = self._retry_at - time.monotonic()
        if wait > 0:
            error = ModelUnavailable(
                f"its process crashed {self.crashes} times in a row ({self.last_exit}); the "
                f"next one starts in {wait:.1f} s"
            )
            error.headers = {"Retry-After": str(math.ceil(wait))}
            raise error
        try:
            self._spawn()
        except ModelLoadFailed as exc:
            self._crashed(f"its restart failed: {exc.message}")
            raise ModelUnavailable(
                f"its process could not be started again: {exc.message}"
            ) from None
        self.restarts += 1
        assert self._connection is not None
        return self._connection

    def _crashed(self, how: str) -> None:
        process, self._process = self._process, None
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self.crashes += 1
        self.last_exit = how
        delay = 0.0 if self.crashes <= 1 else BACKOFF_FIRST_S * 2 ** (self.crashes - 2)
        self._retry_at = time.monotonic() + min(delay, BACKOFF_MAX_S)
        pid = process.pid if process is not None else "?"
        logger.error("%s: predictor process %s %s", self.spec.label, pid, how)

    # --- answering --------------------------------------------------------------------------

    def exchange(self, requests: Sequence[PayloadRequest], batch: bool) -> list[Reply]:
        wire = [(r.body, r.content_type, dict(r.query_params), dict(r.headers)) for r in requests]
        message = ("predict", batch, wire)
        with self._lock:
            connection = self._running()
            try:
                connection.send(message)
                resend = False
            except OSError:
                # It died before this request reached it (found only now): start another.
                self._crashed(_exit_text(self._reap()))
                connection, resend = self._running(), True
            try:
                if resend:
                    connection.send(message)
                if not connection.poll(self.spec.timeout_s):
                    self._reap(kill=True)
                    self._crashed(
                        f"was killed: no answer within timeout_s = {self.spec.timeout_s:g} s"
                    )
                    raise ModelUnavailable(
                        f"the predictor did not answer within timeout_s = "
                        f"{self.spec.timeout_s:g} s; its process was killed and a new one "
                        "starts on the next request"
                    )
                answer = connection.recv()
            except (EOFError, OSError):
                how = _exit_text(self._reap())
                self._crashed(how)
                raise ModelUnavailable(
                    f"its process {how} while answering; a new one starts on the next request"
                ) from None
            self.crashes = 0
        if answer[0] == "error":
            _, code, text = answer
            raise _ERRORS.get(code, PredictionFailed)(text)
        return [
            Reply(body, status, media_type, tuple(headers))
            for status, media_type, headers, body in answer[1]
        ]

    def _reap(self, kill: bool = False) -> int:
        assert self._process is not None
        return _reap(self._process, kill=kill)

    # --- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            process, connection = self._process, self._connection
            self._process = self._connection = None
        if process is None or connection is None:
            return
        try:
            connection.send(("close",))
            if connection.poll(CLOSE_TIMEOUT_S):
                connection.recv()
        except (EOFError, OSError):
            pass
        finally:
            connection.close()
        _reap(process, kill=process.poll() is None, grace_s=CLOSE_TIMEOUT_S)
        logger.info("%s: predictor process %d ended", self.spec.label, process.pid)

    def describe(self) -> dict[str, Any]:
        process = self._process
        alive = process is not None and process.poll() is None
        if self._closed:
            state = "stopped"
        elif alive:
            state = "running"
        elif self._retry_at > time.monotonic():
            state = "backoff"
        else:
            state = "crashed"  # a new process starts on the next request
        described: dict[str, Any] = {
            "state": state,
            "pid": process.pid if alive and process is not None else None,
            "restarts": self.restarts,
            "crashes_in_a_row": self.crashes,
            "last_exit": self.last_exit,
        }
        if state == "backoff":
            described["restart_in_s"] = round(self._retry_at - time.monotonic(), 3)
        if alive and process is not None:
            described["rss_bytes"] = contract.rss_bytes(process.pid)
        return described

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None


class IsolatedModel:
    """`multiserve.types.PayloadModel` over a predictor in a child process."""

    def __init__(self, process: PredictorProcess, class_name: str) -> None:
        self.metadata = NO_TENSORS
        self._process = process
        self._class_name = class_name
        pid = process.pid
        rss = contract.rss_bytes(pid) if pid is not None else None
        # Its cost is the child's resident memory once the predictor is constructed.
        self.memory_bytes = rss or 0

    def answer(self, request: PayloadRequest) -> Reply:
        return self._process.exchange([request], batch=False)[0]

    def describe(self) -> Mapping[str, Any]:
        return {
            "predictor": {
                "class": self._class_name,
                "isolation": "process",
                "process": self._process.describe(),
            }
        }

    def close(self) -> None:
        self._process.close()


class BatchingIsolatedModel(IsolatedModel):
    def answer_batch(self, requests: Sequence[PayloadRequest]) -> list[Reply]:
        return self._process.exchange(requests, batch=True)


def load(spec: ChildSpec) -> IsolatedModel:
    process = PredictorProcess(spec)
    process.start()
    class_name = str(process.info.get("class", "?"))
    if process.info.get("batches"):
        return BatchingIsolatedModel(process, class_name)
    return IsolatedModel(process, class_name)


def _reap(process: subprocess.Popen[bytes], *, kill: bool = False, grace_s: float = 5.0) -> int:
    """Wait for the child to exit (killing it first, or once ``grace_s`` has passed), so it
    leaves no zombie; its return code."""
    if kill:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    try:
        return process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return process.wait()


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"
