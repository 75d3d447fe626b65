"""What watching the models costs: throughput of the small model (the throughput section's
``mlp``, batch 1, JSON, ``wrk -t2 -c16``) with drift monitoring off, on (the defaults: a window
of 1,000 rows against the first 1,000), and on with payload samples at the default 1% rate.

    .venv/bin/python -m benchmarks.monitoring_cost [--runs 5] [--seconds 5]

Three server processes run at once; the two not measured are paused (SIGSTOP), and the runs
are interleaved, round-robin with the order rotated each round, so that the machine's drift
over time falls on every variant alike. Reported: the median requests/s and p99 of each, and
each variant's median against the monitoring-off median of the same run. Target (issue 15):
drift monitoring costs at most 5% of throughput. Results in
benchmarks/results/monitoring_cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from benchmarks import models, wrk
from benchmarks.harness import (
    REPO_ROOT,
    Deadline,
    ServerProcess,
    call,
    display_path,
    free_port,
    median,
    only_running,
    result_header,
    start_server,
    write_json,
)
from benchmarks.suite import multiserve_argv

PATH = "/models/mlp/1/predict"
HEADERS = {"Content-Type": "application/json"}
VARIANTS = {
    "off": ("drift monitoring off", ["--drift-window", "0"]),
    "drift": ("drift monitoring on (defaults)", []),
    "drift_samples": ("drift on + payload samples at 1%", ["--payload-log-rate", "0.01"]),
}
RESULT = REPO_ROOT / "benchmarks" / "results" / "monitoring_cost.json"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def observe_cost_us(requests: int = 50_000) -> float:
    """Microseconds of a model worker's time per answered request that drift monitoring
    takes (defaults, one request per hand-off, as under light load; in steady state), timed
    in this process: a figure the machine's noise moves far less than throughput's."""
    import time

    import numpy as np

    from multiserve.monitor import DriftMonitor, DriftSettings
    from multiserve.types import ModelMetadata, TensorSpec
    from multiserve.watch import VersionWatch

    metadata = ModelMetadata(
        inputs=(TensorSpec("x", "float32", (-1, models.MLP_FEATURES)),),
        outputs=(TensorSpec("probabilities", "float32", (-1, 3)),),
    )
    watch = VersionWatch("mlp", 1, DriftMonitor("mlp", 1, metadata, DriftSettings()), None)
    xs = models.inputs(models.MLP_FEATURES)
    answer = {"probabilities": np.zeros((1, 3), np.float32)}
    for i in range(3000):  # the reference rows, then a full window
        watch([({"x": xs[i % 64]}, answer)])
    started = time.perf_counter()
    for i in range(requests):
        watch([({"x": xs[i % 64]}, answer)])
    return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="rounds of every variant")
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    deadline = Deadline(900)
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="monitoring-cost-") as tmp:
        root = Path(tmp)
        models.write_mlp(root / "models" / "mlp" / "1" / "model.onnx")
        xs = models.inputs(models.MLP_FEATURES)
        load = wrk.Load(PATH, tuple(models.json_body(x) for x in xs), HEADERS)
        servers: dict[str, ServerProcess] = {}
        for key, (_, extra) in VARIANTS.items():
            port = free_port()
            argv = multiserve_argv(root / "models", port, "--log-level", "warning", *extra)
            if key == "drift_samples":
                argv += ["--payload-log-dir", str(root / "payloads")]
            server = start_server(key, argv, port, root, "/readyz", deadline)
            stack.callback(server.stop)
            servers[key] = server
        every = list(servers.values())
        for key, server in servers.items():
            # Past the reference rows and a full window: the steady state is measured.
            with only_running(server, every):
                for i in range(2200):
                    answer = call(server.port, "POST", PATH, models.json_body(xs[i % 64]), HEADERS)
                    if answer.status != 200:
                        raise SystemExit(f"{key}: {answer.status} {answer.body[:200]!r}")
                wrk.run(server.port, load, duration_s=1, connections=16, threads=2)  # warm-up
        results: dict[str, list[wrk.WrkResult]] = {key: [] for key in VARIANTS}
        # The server's CPU time per request: what other tenants of a shared machine move much
        # less than they move throughput.
        cpu_us: dict[str, list[float]] = {key: [] for key in VARIANTS}
        order = list(VARIANTS)
        for round_index in range(args.runs):
            deadline.check("measuring")
            rotated = order[round_index % len(order) :] + order[: round_index % len(order)]
            for key in rotated:
                with only_running(servers[key], every):
                    before = cpu_seconds(servers[key].pid)
                    result = wrk.run(
                        servers[key].port,
                        load,
                        duration_s=args.seconds,
                        connections=16,
                        threads=2,
                    )
                    spent = cpu_seconds(servers[key].pid) - before
                    results[key].append(result)
                    cpu_us[key].append(spent / max(result.requests, 1) * 1e6)
        drift = json.loads(call(servers["drift"].port, "GET", "/models/mlp/1/monitor").body)
    baseline = median([r.requests_per_s for r in results["off"]])
    cpu_baseline = median(cpu_us["off"])
    figures: dict[str, Any] = {}
    for key, (label, _) in VARIANTS.items():
        rps = median([r.requests_per_s for r in results[key]])
        figures[key] = {
            "label": label,
            "requests_per_s_median": round(rps, 1),
            "p99_ms_median": round(median([r.latency_us["99"] / 1e3 for r in results[key]]), 3),
            "server_cpu_us_per_request_median": round(median(cpu_us[key]), 2),
            "cpu_ratio_to_off": round(median(cpu_us[key]) / cpu_baseline, 3),
            "server_cpu_us_per_request": [round(v, 2) for v in cpu_us[key]],
            "ratio_to_off": round(rps / baseline, 3),
            # Each round's ratio to the same round's monitoring-off run, then their median:
            # less sensitive to the machine's load drifting between rounds.
            "paired_ratio_median": round(
                median(
                    [
                        r.requests_per_s / off.requests_per_s
                        for r, off in zip(results[key], results["off"], strict=True)
                    ]
                ),
                3,
            ),
            "runs": [r.summary() for r in results[key]],
        }
    observe_us = observe_cost_us()
    request_us = 1e6 / baseline
    cost = 1 - figures["drift"]["ratio_to_off"]
    paired_cost = 1 - figures["drift"]["paired_ratio_median"]
    record = {
        **result_header("monitoring_cost"),
        "settings": {"runs": args.runs, "seconds": args.seconds, "wrk": "-t2 -c16", "path": PATH},
        "figures": figures,
        "drift_monitor_after_run": drift["monitor"],
        "in_process": {
            "observe_us_per_request": round(observe_us, 2),
            "request_us_at_off_median": round(request_us, 1),
            "share": round(observe_us / request_us, 4),
        },
        "target": {
            "what": "drift monitoring costs at most 5% of throughput",
            "cost": round(cost, 3),
            "paired_cost": round(paired_cost, 3),
            "met": cost <= 0.05 and paired_cost <= 0.05,
        },
    }
    write_json(args.out, record)
    for figure in figures.values():
        print(
            f"{figure['label']:36s} {figure['requests_per_s_median']:9.1f} req/s  "
            f"p99 {figure['p99_ms_median']:7.3f} ms  x{figure['ratio_to_off']:.3f} "
            f"(paired x{figure['paired_ratio_median']:.3f})  "
            f"CPU {figure['server_cpu_us_per_request_median']:6.1f} us/request "
            f"x{figure['cpu_ratio_to_off']:.3f}"
        )
    print(
        f"in process: {observe_us:.2f} us per request observed, "
        f"{100 * observe_us / request_us:.1f}% of a request at {baseline:.0f} req/s"
    )
    print(
        f"drift monitoring cost: {100 * cost:.1f}% of the medians, {100 * paired_cost:.1f}% "
        f"paired (target <= 5%): written to {display_path(args.out)}"
    )


if __name__ == "__main__":
    main()
