"""Section 5: throughput against model size.

Dense MLPs of ~1, 10 and 100 MB (a batch-1 request reads every weight once, so the work grows
with the size) served by one multiserve, each under wrk in turn, in rounds; against the same
model run in loops in a fresh process (benchmarks/inprocess.py throughput): 16 threads (as many
as wrk's connections) calling ``session.run`` on one session, what the same cores do with no HTTP
and no server; and one thread, the latency of a lone call.
"""

from __future__ import annotations

from typing import Any

from benchmarks import models, wrk
from benchmarks.harness import median, only_running
from benchmarks.suite import (
    JSON_HEADERS,
    Context,
    display_argv,
    ratio,
    run_inprocess,
    start_multiserve,
    wait_until_ok,
)


def _name(size: int) -> str:
    return f"dense{size // 1_000_000}mb"


def run(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    root = ctx.subdir("scaling") / "models"
    artifacts = {}
    for size in plan.scaling_sizes:
        path = models.write_dense_onnx(root / _name(size) / "1" / "model.onnx", size, seed=size)
        (path.parent / "READY").touch()
        artifacts[size] = path
    xs = models.inputs(models.DENSE_FEATURES)
    bodies = tuple(models.json_body(x) for x in xs)
    server = start_multiserve(ctx, root, name="multiserve-scaling")
    loads = {}
    for size in plan.scaling_sizes:
        loads[size] = wrk.Load(f"/models/{_name(size)}/1/predict", bodies, JSON_HEADERS)
        wait_until_ok(server.port, loads[size].path, bodies[0], JSON_HEADERS, 120.0, server)
        wrk.run(
            server.port,
            loads[size],
            duration_s=plan.warmup_s,
            connections=plan.connections,
            threads=plan.wrk_threads,
        )
    runs: dict[int, list[wrk.WrkResult]] = {size: [] for size in plan.scaling_sizes}
    inprocess: dict[int, list[dict[str, Any]]] = {size: [] for size in plan.scaling_sizes}
    for round_index in range(plan.scaling_rounds):
        for size in plan.scaling_sizes:
            ctx.deadline.check("timing throughput against model size")
            with only_running(server, [server]):
                result = wrk.run(
                    server.port,
                    loads[size],
                    duration_s=plan.scaling_run_s,
                    connections=plan.connections,
                    threads=plan.wrk_threads,
                )
            runs[size].append(result)
            # The in-process baseline right after, with the server paused: the same noise.
            server.pause()
            try:
                inprocess[size].append(
                    run_inprocess(
                        ctx,
                        "throughput",
                        artifacts[size],
                        "--seconds",
                        str(plan.scaling_run_s),
                        "--threads",
                        str(plan.connections),
                    )
                )
            finally:
                server.resume()
            ctx.log(
                f"scaling: round {round_index + 1}/{plan.scaling_rounds} {_name(size)}: "
                f"multiserve {result.requests_per_s:.0f} req/s (failed {result.failed}), "
                f"in-process {inprocess[size][-1]['runs_per_s']:.0f} runs/s"
            )
    server.stop()

    figures = {}
    for size in plan.scaling_sizes:
        single = run_inprocess(
            ctx, "throughput", artifacts[size], "--seconds", str(plan.inprocess_s), "--threads", "1"
        )
        summaries = [r.summary() for r in runs[size]]
        rps = median([s["requests_per_s"] for s in summaries])
        inprocess_rps = median([r["runs_per_s"] for r in inprocess[size]])
        figures[_name(size)] = {
            "model_bytes": artifacts[size].stat().st_size,
            "requests_per_s": round(rps, 1),
            "p50_ms": round(median([s["p50_ms"] for s in summaries]), 3),
            "p99_ms": round(median([s["p99_ms"] for s in summaries]), 3),
            "failed": sum(s["failed"] for s in summaries),
            "inprocess_runs_per_s": round(inprocess_rps, 1),
            "inprocess_p50_ms": round(median([r["p50_ms"] for r in inprocess[size]]), 3),
            "inprocess_p99_ms": round(median([r["p99_ms"] for r in inprocess[size]]), 3),
            "inprocess_one_thread_runs_per_s": round(single["runs_per_s"], 1),
            "inprocess_one_thread_p50_ms": round(single["p50_ms"], 3),
            "ratio_to_inprocess": ratio(rps, inprocess_rps),
            "runs": summaries,
            "inprocess_runs": [
                {k: round(float(v), 3) for k, v in r.items()} for r in inprocess[size]
            ],
        }
        ctx.log(
            f"scaling: {_name(size)} multiserve {rps:.0f} req/s, in-process "
            f"{inprocess_rps:.0f} runs/s ({plan.connections} threads), "
            f"{single['runs_per_s']:.0f} runs/s (1 thread)"
        )
    return {
        "settings": {
            "models": f"dense MLP, x float32 [1, {models.DENSE_FEATURES}], hidden width from "
            "the size",
            "rounds": plan.scaling_rounds,
            "run_s": plan.scaling_run_s,
            "wrk": f"-t{plan.wrk_threads} -c{plan.connections} -d{plan.scaling_run_s}s",
            "inprocess": "python benchmarks/inprocess.py throughput MODEL: session.run in a "
            f"loop on {plan.connections} threads (as many as wrk's connections), one session, "
            f"{plan.scaling_run_s} s right after each wrk run (the server paused); and on 1 "
            f"thread, {plan.inprocess_s:g} s",
            "command": display_argv(server.argv, {str(root): "MODELS"}),
        },
        "figures": figures,
    }
