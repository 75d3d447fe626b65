"""gRPC load from h2load (nghttp2's HTTP/2 benchmarking tool, C++): the compiled load generator
for the gRPC face, as wrk is for HTTP. ghz, the usual gRPC one, is a Go binary that no package
registry reachable here ships; h2load is Debian's ``nghttp2-client``.

gRPC is HTTP/2 with a framed body, so h2load speaks it when it POSTs the framed message
(1 byte "not compressed", 4 bytes big-endian length, the protobuf) with ``content-type:
application/grpc`` and ``te: trailers``. What it cannot see is the ``grpc-status`` trailer: a
failed call is still HTTP 200. The caller counts those from the server's own metrics.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import BenchmarkError

HOST = "127.0.0.1"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def frame(message: bytes) -> bytes:
    """One gRPC message as it travels in the HTTP/2 body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True, slots=True)
class H2Result:
    done: int
    succeeded: int  # HTTP-level: 2xx answers (a gRPC error is one too)
    failed: int  # HTTP-level failures, errors and timeouts
    duration_s: float
    latencies_us: tuple[float, ...]
    settings: dict[str, Any]

    @property
    def requests_per_s(self) -> float:
        return self.done / self.duration_s if self.duration_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_us:
            return float("nan")
        return float(np.percentile(np.asarray(self.latencies_us), q)) / 1e3

    def summary(self, grpc_failed: int = 0) -> dict[str, Any]:
        return {
            "requests_per_s": round(self.requests_per_s, 1),
            "requests": self.done,
            "duration_s": round(self.duration_s, 3),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "p99.9_ms": round(self.percentile_ms(99.9), 3),
            "max_ms": round(max(self.latencies_us, default=0.0) / 1e3, 3),
            "failed": self.failed + grpc_failed,
        }


def h2load_binary() -> str:
    found = shutil.which("h2load")
    if found is None:
        raise BenchmarkError(
            "h2load is not installed: apt-get update && apt-get install nghttp2-client"
        )
    return found


def h2load_version() -> str:
    completed = subprocess.run(
        [h2load_binary(), "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    return completed.stdout.strip().splitlines()[0]


_DONE = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s)")


def run(
    port: int, path: str, body: bytes, *, duration_s: int, connections: int, threads: int
) -> H2Result:
    """``connections`` HTTP/2 connections, one call in flight on each (as wrk's connections),
    POSTing ``body`` to ``path`` for ``duration_s`` seconds."""
    with tempfile.TemporaryDirectory(prefix="multiserve-h2load-") as workdir:
        body_path = Path(workdir) / "body.bin"
        body_path.write_bytes(body)
        log_path = Path(workdir) / "requests.tsv"
        argv = [
            h2load_binary(),
            f"--threads={threads}",
            f"--clients={connections}",
            "--max-concurrent-streams=1",
            f"--duration={max(1, duration_s)}",
            f"--data={body_path}",
            f"--log-file={log_path}",
        ]
        for header in GRPC_HEADERS:
            argv += ["--header", header]
        argv.append(f"http://{HOST}:{port}{path}")
        try:
            completed = subprocess.run(
                argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchmarkError(f"h2load did not finish: {' '.join(argv)}") from exc
        done = _DONE.search(completed.stdout)
        finished = _FINISHED.search(completed.stdout)
        if completed.returncode != 0 or done is None or finished is None:
            raise BenchmarkError(
                f"h2load failed ({completed.returncode}): {completed.stdout[-2000:]}"
                f"{completed.stderr[-2000:]}"
            )
        latencies = []
        for line in log_path.read_text().splitlines():
            columns = line.split("\t")
            if len(columns) >= 3 and columns[1].startswith("2"):
                latencies.append(float(columns[2]))
    seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    _, _, completed_count, succeeded, failed, errored, timeout = map(int, done.groups())
    return H2Result(
        done=completed_count,
        succeeded=succeeded,
        failed=failed + errored + timeout,
        duration_s=seconds,
        latencies_us=tuple(latencies),
        settings={"threads": threads, "connections": connections, "duration_s": duration_s},
    )
