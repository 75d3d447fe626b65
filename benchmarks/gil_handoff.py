"""What a GIL hand-off costs on this machine: the limit under a one-process server's throughput.

    .venv/bin/python benchmarks/gil_handoff.py [--seconds 2]

multiserve runs a model's inference in a worker thread (never on the event loop), and the
runtime releases the GIL while it computes. When the event loop is busy, the worker then has
to wait for the GIL to come back, and the hand-off (a futex wake and a context switch, dear
in a VM) is paid in CPU by both threads. This script times, in one thread:

- ``select(0)``: a C call that releases and retakes the GIL and does nothing else;
- ``session.run``: onnxruntime on the benchmark's small MLP, batch 1 (it releases the GIL);
- ``session.run, 16 rows``: the same model on 16 rows at once, per row;

each alone, then with a second thread running Python all the time (as a busy event loop
does), and prints CPU microseconds per call (``time.thread_time``) and wall microseconds per
call. Writes ``benchmarks/results/gil_handoff.json``.
"""

from __future__ import annotations

import argparse
import select
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort

from benchmarks import models
from benchmarks.harness import (
    RESULTS_DIR,
    display_path,
    result_header,
    write_json,
)


def timed(call: Callable[[], object], seconds: float, per_call: int = 1) -> dict[str, float]:
    """CPU and wall microseconds per unit of work, calling for about ``seconds``."""
    calls = 0
    cpu, wall = time.thread_time(), time.perf_counter()
    end = wall + seconds
    while time.perf_counter() < end:
        call()
        calls += 1
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    units = calls * per_call
    return {"cpu_us": round(cpu / units * 1e6, 2), "wall_us": round(wall / units * 1e6, 2)}


def timed_beside_busy_thread(
    call: Callable[[], object], seconds: float, per_call: int = 1
) -> dict[str, float]:
    """`timed`, while another thread runs Python without pause (as a busy event loop does)."""
    stop = threading.Event()

    def busy() -> None:
        spins = 0
        while not stop.is_set():
            spins += 1

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        return timed(call, seconds, per_call)
    finally:
        stop.set()
        thread.join()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gil_handoff.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="multiserve-gil-") as workdir:
        model = models.write_mlp(Path(workdir) / "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    one = {"x": np.ones((1, models.MLP_FEATURES), np.float32)}
    sixteen = {"x": np.ones((16, models.MLP_FEATURES), np.float32)}
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("select(0)", lambda: select.select([], [], [], 0), 1),
        ("session.run", lambda: session.run(None, one), 1),
        ("session.run, 16 rows (per row)", lambda: session.run(None, sixteen), 16),
    ]
    figures: dict[str, Any] = {}
    for name, call, per_call in cases:
        alone = timed(call, args.seconds, per_call)
        busy = timed_beside_busy_thread(call, args.seconds, per_call)
        figures[name] = {
            "alone": alone,
            "busy_thread": busy,
            "cpu_ratio": round(busy["cpu_us"] / alone["cpu_us"], 1),
        }
    write_json(
        args.output,
        {
            **result_header("benchmarks/gil_handoff.py"),
            "python": sys.version.split()[0],
            "switch_interval_s": sys.getswitchinterval(),
            "onnxruntime": ort.__version__,
            "settings": {"seconds": args.seconds, "intra_op_num_threads": 1},
            "figures": figures,
        },
    )
    print(f"{'call':<32}{'alone cpu/wall us':>20}{'busy thread cpu/wall us':>26}{'cpu x':>8}")
    for name, figure in figures.items():
        alone, busy = figure["alone"], figure["busy_thread"]
        print(
            f"{name:<32}{alone['cpu_us']:>10.1f}/{alone['wall_us']:<9.1f}"
            f"{busy['cpu_us']:>15.1f}/{busy['wall_us']:<10.1f}{figure['cpu_ratio']:>8.1f}"
        )
    print(f"wrote {display_path(args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
