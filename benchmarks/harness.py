"""What every benchmark section shares: a deadline, server subprocesses on free loopback ports
(paused while another server is measured), small HTTP helpers, process memory, and the record of
the machine and versions that goes with every result."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
STOP_TIMEOUT_S = 15.0
PACKAGES = (
    "multiserve",
    "multiserve-onnx",
    "onnxruntime",
    "numpy",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "orjson",
    "anyio",
    "watchfiles",
)
MIB = 1024 * 1024


class BenchmarkError(RuntimeError):
    """A section cannot go on: a server would not start, answered wrongly, or time ran out."""


class Deadline:
    """Bounds the whole run: every wait checks it, so no run can hang."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def check(self, doing: str) -> None:
        if self.remaining() <= 0:
            raise BenchmarkError(
                f"the run went past --max-seconds {self.seconds:g} while {doing}; "
                "ask for a smaller run (--quick, --requests) or raise --max-seconds"
            )

    def bound(self, seconds: float) -> float:
        """``seconds``, or what is left of the run if that is less (at least 1 s)."""
        return max(1.0, min(seconds, self.remaining()))


def free_port() -> int:
    # Free when this returns; nothing else on a benchmark machine should race for it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 30.0,
) -> Answer:
    """One request on a new connection."""
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        connection.request(method, path, body, dict(headers or {}))
        response = connection.getresponse()
        content = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, content)
    finally:
        connection.close()


@dataclass(slots=True)
class ServerProcess:
    """A server in its own process group, so that it (and any workers it starts) can be paused,
    resumed and stopped as one, by its own id."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    paused: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def pause(self) -> None:
        """SIGSTOP the whole group: an idle server must not take CPU from the one measured."""
        if not self.paused and self.process.poll() is None:
            os.killpg(self.pid, signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused and self.process.poll() is None:
            os.killpg(self.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.paused:
                os.killpg(self.pid, signal.SIGCONT)
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=STOP_TIMEOUT_S)
        # Workers the leader left behind in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-chars:] if text else "(the server wrote nothing)"

    def status_kib(self, field_name: str) -> int | None:
        """A field of /proc/<pid>/status in KiB (VmRSS, VmHWM), or None once it has exited."""
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith(field_name + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def rss_bytes(self) -> int:
        kib = self.status_kib("VmRSS")
        if kib is None:
            raise BenchmarkError(f"{self.name} exited:\n{self.log_tail()}")
        return kib * 1024

    def peak_rss_bytes(self) -> int:
        kib = self.status_kib("VmHWM")
        if kib is None:
            raise BenchmarkError(f"{self.name} exited:\n{self.log_tail()}")
        return kib * 1024


def start_server(
    name: str,
    argv: Sequence[str],
    port: int,
    log_dir: Path,
    ready_path: str,
    deadline: Deadline,
    *,
    ready_timeout_s: float = 90.0,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Start a server and wait until ``GET ready_path`` answers 200. The caller stops it."""
    log_path = log_dir / f"{name.replace(' ', '-')}-{port}.log"
    with log_path.open("wb") as log:
        # Output goes to a file, not a pipe, so that a chatty server never blocks on a full pipe.
        process = subprocess.Popen(
            list(argv),
            cwd=cwd or REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    server = ServerProcess(name, list(argv), port, log_path, process)
    try:
        wait_ready(server, ready_path, deadline.bound(ready_timeout_s))
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: ServerProcess, path: str, timeout_s: float) -> None:
    give_up = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise BenchmarkError(
                f"{server.name} exited with status {server.process.returncode} before it was "
                f"ready:\n{server.log_tail()}"
            )
        with contextlib.suppress(OSError):
            if call(server.port, "GET", path, timeout_s=2.0).status == 200:
                return
        if time.monotonic() > give_up:
            raise BenchmarkError(
                f"{server.name} on port {server.port} was not ready within {timeout_s:g} s:\n"
                + server.log_tail()
            )
        time.sleep(0.05)


@contextlib.contextmanager
def only_running(target: ServerProcess, servers: Sequence[ServerProcess]) -> Iterator[None]:
    """Pause every server but ``target`` for the duration."""
    for server in servers:
        if server is not target:
            server.pause()
    target.resume()
    try:
        yield
    finally:
        for server in servers:
            server.resume()


class RssSampler:
    """Polls a server's resident memory in a background thread while in a ``with`` block."""

    def __init__(self, server: ServerProcess, interval_s: float = 0.02) -> None:
        self.server = server
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="rss-sampler", daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            kib = self.server.status_kib("VmRSS")
            if kib is not None:
                self.samples.append((time.monotonic(), kib * 1024))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    return {
        "platform": platform.platform(),
        "cpu_model": model or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(memory_kib / MIB, 1),
        "python": platform.python_version(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_revision() -> str:
    """The commit measured, with ``-dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def result_header(benchmark: str) -> dict[str, Any]:
    """What every results file starts with: which script, when, at which revision, where."""
    return {
        "benchmark": benchmark,
        "timestamp": now_iso(),
        "revision": git_revision(),
        "machine": machine_info(),
    }


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed, so an interrupted run never leaves half a file.
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    partial.replace(path)


def display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
