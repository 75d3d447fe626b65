"""In-process onnxruntime baselines, each run in a fresh subprocess so that nothing the
benchmark process holds (imports, caches, other sessions) helps or hinders it. Prints one JSON
line.

    python benchmarks/inprocess.py load MODEL          # InferenceSession(...) plus one run
    python benchmarks/inprocess.py throughput MODEL --seconds 3 [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def _session(path: str) -> Any:
    import onnxruntime as ort

    # The options multiserve uses for a model without a config.toml: onnxruntime's defaults.
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _zeros(session: Any) -> dict[str, Any]:
    feeds = {}
    for arg in session.get_inputs():
        shape = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in arg.shape]
        feeds[arg.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def measure_load(path: str) -> dict[str, float]:
    import onnxruntime  # noqa: F401  (imported before the clock starts, as a server has it)

    started = time.perf_counter()
    session = _session(path)
    created = time.perf_counter()
    session.run(None, _zeros(session))
    finished = time.perf_counter()
    return {
        "session_s": created - started,
        "first_run_s": finished - created,
        "total_s": finished - started,
    }


def measure_throughput(path: str, seconds: float, threads: int) -> dict[str, float]:
    """``threads`` threads call ``session.run`` in a loop on one session (onnxruntime releases
    the GIL while it runs), for ``seconds``."""
    session = _session(path)
    feeds = _zeros(session)
    rng = np.random.default_rng(0)
    for name, value in feeds.items():
        feeds[name] = rng.normal(size=value.shape).astype(np.float32)
    for _ in range(5):
        session.run(None, feeds)
    latencies: list[list[float]] = [[] for _ in range(threads)]
    start = time.perf_counter()
    end = start + seconds

    def loop(mine: list[float]) -> None:
        while True:
            started = time.perf_counter()
            if started >= end:
                return
            session.run(None, feeds)
            mine.append(time.perf_counter() - started)

    workers = [threading.Thread(target=loop, args=(mine,)) for mine in latencies]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    every = np.asarray([x for mine in latencies for x in mine])
    p50, p99 = np.percentile(every, [50, 99])
    return {
        "threads": threads,
        "runs": int(every.size),
        "runs_per_s": every.size / elapsed,
        "p50_ms": float(p50) * 1e3,
        "p99_ms": float(p99) * 1e3,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["load", "throughput"])
    parser.add_argument("model")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    if args.mode == "load":
        result: dict[str, float] = measure_load(args.model)
    else:
        result = measure_throughput(args.model, args.seconds, args.threads)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
