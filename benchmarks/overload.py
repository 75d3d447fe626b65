"""A slow model at 1x, 2x, 4x and 8x its capacity, with and without admission control.

    python benchmarks/overload.py [--seconds 6] [--service-s 0.1] [--threads 1]
        [--max-queue 3] [--client-timeout-s 0.5] [--today-python /path/to/main/.venv/bin/python]

The model: a Python predictor that sleeps ``--service-s`` per request, run by ``--threads``
inference threads, so its capacity is ``threads / service_s`` requests per second and 1x load
is ``threads`` closed-loop clients (2x: twice as many, and so on). Each client sends a request,
waits for its answer, and sends the next; it gives up on a request after
``--client-timeout-s`` (closing its connection, as a client library's timeout does) and, on a
503, waits 50 ms before the next.

Two servers are measured in the same run, one after the other, each at every level:

- **admission**: this checkout, ``--max-queue`` (the wait a request may have is then about
  ``max_queue x service_s / threads``); clients that go away are not run.
- **today**: ``--today-python`` (the interpreter of a checkout without admission control, e.g.
  main's ``.venv/bin/python``), else this checkout with ``--max-queue 0`` (no bound, but clients
  that went away are still skipped, so it understates today's problem).

Per level: goodput (200s answered within the client's timeout, per second), p50 and p99 of the
answered requests, 503s, client timeouts, and a fresh request sent 100 ms after the storm's
clients leave (their requests still queued), until it gets a 200. Writes
``benchmarks/results/overload.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    HOST,
    RESULTS_DIR,
    Deadline,
    ServerProcess,
    display_path,
    free_port,
    median,
    result_header,
    start_server,
    write_json,
)

LEVELS = (1, 2, 4, 8)
PREDICTOR = """
import time


class Predictor:
    def __init__(self, model_dir, config):
        self.seconds = float(config.get("service_s", 0.1))

    def predict(self, payload):
        time.sleep(self.seconds)
        return {"ok": True}
"""
BODY = b'{"x": 1}'
PATH = "/models/slow/1/predict"


@dataclass
class Level:
    load: int
    clients: int
    seconds: float
    answered: int = 0
    shed: int = 0
    timeouts: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    fresh_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, what: str, latency: float | None = None) -> None:
        with self.lock:
            setattr(self, what, getattr(self, what) + 1)
            if latency is not None:
                self.latencies.append(latency)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] if ordered else None
        return {
            "load": f"{self.load}x",
            "clients": self.clients,
            "goodput_per_s": round(self.answered / self.seconds, 2),
            "p50_s": round(median(ordered), 4) if ordered else None,
            "p99_s": round(p99, 4) if p99 is not None else None,
            "shed_503": self.shed,
            "client_timeouts": self.timeouts,
            "other_errors": self.errors,
            "fresh_after_storm_s": round(self.fresh_s, 4),
        }


class Client(threading.Thread):
    def __init__(self, port: int, level: Level, stop: threading.Event, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.level, self.stop, self.timeout_s = port, level, stop, timeout_s
        self.connection: http.client.HTTPConnection | None = None
        self.lock = threading.Lock()

    def abandon(self) -> None:
        """Leave now, as a client whose user gave up: close the connection mid-request."""
        with self.lock:
            connection = self.connection
            if connection is not None and connection.sock is not None:
                with contextlib.suppress(OSError):
                    connection.sock.shutdown(socket.SHUT_RDWR)

    def run(self) -> None:
        level = self.level
        while not self.stop.is_set():
            connection = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout_s)
            started = time.perf_counter()
            try:
                # Connected under the lock: once `abandon` ran, no request starts.
                with self.lock:
                    if self.stop.is_set():
                        break
                    connection.connect()
                    self.connection = connection
                connection.request("POST", PATH, BODY, {"content-type": "application/json"})
                response = connection.getresponse()
                response.read()
                elapsed = time.perf_counter() - started
                if self.stop.is_set():
                    break
                if response.status == 200:
                    level.count("answered", elapsed)
                elif response.status == 503:
                    level.count("shed")
                    time.sleep(0.05)
                else:
                    level.count("errors")
            except TimeoutError:
                level.count("timeouts")
            except (OSError, http.client.HTTPException):
                if not self.stop.is_set():
                    level.count("errors")
            finally:
                connection.close()


def timed_request(port: int, timeout_s: float = 60.0) -> float:
    connection = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        started = time.perf_counter()
        connection.request("POST", PATH, BODY, {"content-type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"a lone request got {response.status}")
        return time.perf_counter() - started
    finally:
        connection.close()


def fresh_request(port: int) -> float:
    """Seconds until a 200, retrying a 503 after 50 ms, as the storm's clients do."""
    started = time.perf_counter()
    while True:
        try:
            timed_request(port)
            return time.perf_counter() - started
        except RuntimeError:
            time.sleep(0.05)


def storm(port: int, load: int, threads: int, seconds: float, timeout_s: float) -> Level:
    level = Level(load, load * threads, seconds)
    stop = threading.Event()
    clients = [Client(port, level, stop, timeout_s) for _ in range(level.clients)]
    for client in clients:
        client.start()
    time.sleep(seconds)
    stop.set()
    for client in clients:
        client.abandon()  # their requests in flight stay queued on a server that cannot tell
    time.sleep(0.1)
    level.fresh_s = fresh_request(port)
    for client in clients:
        client.join(timeout=10)
    time.sleep(max(1.0, load * threads * 0.1))  # let whatever is still queued drain
    return level


def run_server(
    name: str, python: str, models: Path, args: argparse.Namespace, extra: list[str], logs: Path
) -> ServerProcess:
    port = free_port()
    argv = [
        python,
        "-m",
        "multiserve",
        "serve",
        "--models",
        str(models),
        "--port",
        str(port),
        "--grpc-port",
        "0",
        "--allow-python-predictors",
        "--inference-threads",
        str(args.threads),
        "--log-level",
        "warning",
        *extra,
    ]
    # `python -m multiserve` imports the package from the working directory first: run each
    # interpreter in its own checkout (a venv's python is <checkout>/.venv/bin/python).
    cwd = Path(python).parents[2] if python != sys.executable else None
    return start_server(name, argv, port, logs, "/readyz", Deadline(120), cwd=cwd)


def measure(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    timed_request(server.port)  # loaded
    unloaded = median([timed_request(server.port) for _ in range(5)])
    levels = []
    for load in LEVELS:
        level = storm(server.port, load, args.threads, args.seconds, args.client_timeout_s)
        levels.append(level.summary())
        print(f"  {server.name:9} {json.dumps(levels[-1])}", flush=True)
    return {"unloaded_s": round(unloaded, 4), "levels": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per level")
    parser.add_argument("--service-s", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-queue", type=int, default=3)
    parser.add_argument("--client-timeout-s", type=float, default=0.5)
    parser.add_argument("--today-python", default="")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "overload.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        root = Path(tmp)
        version = root / "models" / "slow" / "1"
        version.mkdir(parents=True)
        (version / "predictor.py").write_text(PREDICTOR)
        (version / "config.toml").write_text(f"service_s = {args.service_s}\n")
        logs = root / "logs"
        logs.mkdir()
        runs = {}
        configs = [
            ("admission", sys.executable, ["--max-queue", str(args.max_queue)]),
            (
                "today",
                args.today_python or sys.executable,
                [] if args.today_python else ["--max-queue", "0"],
            ),
        ]
        for name, python, extra in configs:
            server = run_server(name, python, root / "models", args, extra, logs)
            try:
                runs[name] = measure(server, args)
            finally:
                server.stop()

    capacity = args.threads / args.service_s
    wait_s = args.max_queue * args.service_s / args.threads
    checks = {}
    new = runs["admission"]
    one = new["levels"][0]
    four = new["levels"][2]
    checks["goodput_4x_over_1x"] = round(four["goodput_per_s"] / one["goodput_per_s"], 3)
    checks["p99_bound_s"] = round(2 * one["p99_s"] + wait_s, 4)
    checks["p99_within_bound"] = all(
        level["p99_s"] is not None and level["p99_s"] <= checks["p99_bound_s"]
        for level in new["levels"]
    )
    checks["fresh_within_2x_unloaded"] = all(
        level["fresh_after_storm_s"] <= 2 * new["unloaded_s"] for level in new["levels"]
    )
    result = {
        **result_header("overload"),
        "settings": {
            "service_s": args.service_s,
            "threads": args.threads,
            "capacity_per_s": capacity,
            "max_queue": args.max_queue,
            "configured_wait_s": wait_s,
            "client_timeout_s": args.client_timeout_s,
            "seconds_per_level": args.seconds,
            "today": args.today_python or "this checkout with --max-queue 0",
        },
        "runs": runs,
        "checks": checks,
    }
    write_json(args.out, result)
    print(json.dumps(checks, indent=2))
    print(f"wrote {display_path(args.out)}")


if __name__ == "__main__":
    main()
