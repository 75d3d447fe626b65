"""The plan of a run (full or quick), the context every section gets, and the helpers that start
multiserve and the in-process baselines."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    REPO_ROOT,
    BenchmarkError,
    Deadline,
    ServerProcess,
    call,
    free_port,
    start_server,
)

ADMIN_TOKEN = "benchmark-admin-token"
JSON_HEADERS = {"Content-Type": "application/json"}
NPY_TYPE = "application/x-npy"
NPY_HEADERS = {"Content-Type": NPY_TYPE, "Accept": NPY_TYPE}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INPROCESS_SCRIPT = REPO_ROOT / "benchmarks" / "inprocess.py"


@dataclass(frozen=True, slots=True)
class Plan:
    """How much each section does. ``full()`` is the run the README reports (about 15 minutes
    on 2 cores); ``quick()`` checks that everything works in about 3."""

    name: str
    rounds: int  # timed wrk runs per target; medians are over these
    run_s: int  # seconds per timed wrk run (throughput)
    warmup_s: int  # untimed wrk seconds per target before its first timed run
    connections: int  # wrk -c
    wrk_threads: int  # wrk -t
    swap_versions: int  # versions copied in during the settle-window hot swap run
    marker_versions: int  # versions copied in during the READY-marker hot swap run
    swap_interval_s: float  # one new version every this many seconds
    swap_lead_s: float  # steady load before the first copy
    swap_tail_s: float  # steady load after the last copy
    swap_padding_bytes: int  # unused weights that make each version's file take a while to copy
    cold_model_bytes: int
    cold_repeats: int
    cold_concurrency: int
    memory_models: int
    memory_cache_models: int
    memory_model_bytes: int
    memory_passes: int
    memory_cycles: int
    scaling_sizes: tuple[int, ...]
    scaling_run_s: int
    scaling_rounds: int
    inprocess_s: float
    max_seconds: float

    @classmethod
    def full(cls) -> Plan:
        return cls(
            name="full",
            rounds=5,
            run_s=6,
            warmup_s=3,
            connections=16,
            wrk_threads=2,
            swap_versions=50,
            marker_versions=20,
            swap_interval_s=1.2,
            swap_lead_s=8.0,
            swap_tail_s=4.0,
            swap_padding_bytes=4 * 1024 * 1024,
            cold_model_bytes=100 * 1000 * 1000,
            cold_repeats=5,
            cold_concurrency=16,
            memory_models=100,
            memory_cache_models=10,
            memory_model_bytes=10 * 1000 * 1000,
            memory_passes=2,
            memory_cycles=1000,
            scaling_sizes=(1_000_000, 10_000_000, 100_000_000),
            scaling_run_s=6,
            scaling_rounds=3,
            inprocess_s=3.0,
            max_seconds=1500.0,
        )

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            name="quick",
            rounds=3,
            run_s=2,
            warmup_s=1,
            connections=16,
            wrk_threads=2,
            swap_versions=8,
            marker_versions=4,
            swap_interval_s=1.0,
            swap_lead_s=3.0,
            swap_tail_s=1.0,
            swap_padding_bytes=4 * 1024 * 1024,
            cold_model_bytes=100 * 1000 * 1000,
            cold_repeats=3,
            cold_concurrency=8,
            memory_models=100,
            memory_cache_models=10,
            memory_model_bytes=10 * 1000 * 1000,
            memory_passes=1,
            memory_cycles=100,
            scaling_sizes=(1_000_000, 10_000_000, 100_000_000),
            scaling_run_s=2,
            scaling_rounds=3,
            inprocess_s=1.5,
            max_seconds=420.0,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Context:
    plan: Plan
    deadline: Deadline
    workdir: Path
    stack: contextlib.ExitStack
    notes: list[str] = field(default_factory=list)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    def subdir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def multiserve_argv(models: Path, port: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "multiserve", "serve", "--models", str(models)]
    argv += ["--port", str(port), "--log-level", "warning", "--admin-token", ADMIN_TOKEN]
    if "--grpc-port" not in extra:
        argv += ["--grpc-port", str(free_port())]  # each server its own
    return [*argv, *extra]


def start_multiserve(
    ctx: Context, models: Path, *extra: str, name: str = "multiserve"
) -> ServerProcess:
    """multiserve on a free port, answering /readyz; stopped when the run's stack unwinds."""
    port = free_port()
    server = start_server(
        name,
        multiserve_argv(models, port, *extra),
        port,
        ctx.subdir("logs"),
        "/readyz",
        ctx.deadline,
    )
    ctx.stack.callback(server.stop)
    return server


def wait_until_ok(
    port: int,
    path: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout_s: float,
    server: ServerProcess | None = None,
) -> bytes:
    """POST until the answer is 200 (a model settles, then loads); the 200 answer's body."""
    give_up = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < give_up:
        try:
            answer = call(port, "POST", path, body, headers, timeout_s=timeout_s)
        except OSError as exc:
            last = str(exc)
        else:
            if answer.status == 200:
                return answer.body
            last = f"{answer.status} {answer.body[:300]!r}"
            if answer.status not in (503, 404):
                break
        time.sleep(0.05)
    tail = f"\n{server.log_tail()}" if server is not None else ""
    raise BenchmarkError(f"POST {path} on port {port} never answered 200: {last}{tail}")


def admin_cache(port: int) -> dict[str, Any]:
    answer = call(port, "GET", "/admin/cache", headers=ADMIN_HEADERS)
    if answer.status != 200:
        raise BenchmarkError(f"GET /admin/cache answered {answer.status}: {answer.body[:300]!r}")
    payload: dict[str, Any] = answer.json()
    return payload


def run_inprocess(ctx: Context, mode: str, model: Path, *extra: str) -> dict[str, Any]:
    """One in-process baseline in a fresh interpreter (benchmarks/inprocess.py)."""
    argv = [sys.executable, str(INPROCESS_SCRIPT), mode, str(model), *extra]
    try:
        completed = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=ctx.deadline.bound(300),
            check=False,
            cwd=REPO_ROOT,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchmarkError(f"{' '.join(argv)} timed out") from exc
    if completed.returncode != 0:
        raise BenchmarkError(f"{' '.join(argv)} failed:\n{completed.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def display_argv(argv: Sequence[str], replacements: Mapping[str, str]) -> str:
    shown = {sys.executable: "python", **replacements}
    return " ".join(shown.get(arg, arg) for arg in argv)


def ratio(numerator: float, denominator: float) -> float | None:
    if not denominator or denominator != denominator or numerator != numerator:
        return None
    return round(numerator / denominator, 3)
