"""Section 3: cold load.

The first request to an unloaded ~100 MB ONNX model, against what it costs to create its
onnxruntime session and run it once in a fresh process (benchmarks/inprocess.py). Each repeat
starts a fresh multiserve (the model is found but not loaded), so both sides start from a fresh
process with the file in the page cache; the two take turns. Then N concurrent first requests to
a fresh server must cause exactly one load (``GET /admin/cache`` stats.loads), and a warm server
reloads the model after an evict.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import models
from benchmarks.harness import BenchmarkError, ServerProcess, call, median
from benchmarks.suite import (
    ADMIN_HEADERS,
    JSON_HEADERS,
    Context,
    admin_cache,
    display_argv,
    ratio,
    run_inprocess,
    start_multiserve,
)

MODEL = "big"
PATH = f"/models/{MODEL}/1/predict"
RELOADS = 3


def run(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    root = ctx.subdir("cold") / "models"
    artifact = root / MODEL / "1" / "model.onnx"
    ctx.log(f"cold load: writing a {plan.cold_model_bytes / 1e6:.0f} MB model")
    models.write_dense_onnx(artifact, plan.cold_model_bytes)
    (artifact.parent / "READY").touch()
    artifact.read_bytes()  # into the page cache, for both sides alike
    body = models.json_body(models.inputs(models.DENSE_FEATURES, 1)[0])

    first_requests: list[float] = []
    inprocess: list[dict[str, float]] = []
    argv: list[str] = []
    for repeat in range(plan.cold_repeats):
        ctx.deadline.check("timing cold loads")
        inprocess.append(run_inprocess(ctx, "load", artifact))
        server = start_multiserve(ctx, root, name="multiserve-cold")
        argv = server.argv
        try:
            _wait_available(server)
            started = time.perf_counter()
            answer = call(server.port, "POST", PATH, body, JSON_HEADERS, timeout_s=120)
            elapsed = time.perf_counter() - started
            if answer.status != 200:
                raise BenchmarkError(
                    f"cold predict answered {answer.status}: {answer.body[:300]!r}"
                )
            first_requests.append(elapsed)
            loads = admin_cache(server.port)["stats"]["loads"]
        finally:
            server.stop()
        ctx.log(
            f"cold load {repeat + 1}/{plan.cold_repeats}: multiserve first request "
            f"{elapsed * 1e3:.0f} ms (loads {loads}), in-process session + run "
            f"{inprocess[-1]['total_s'] * 1e3:.0f} ms"
        )

    concurrent = _concurrent_first_requests(ctx, root, body)
    inprocess_total = median([r["total_s"] for r in inprocess])
    first_median = median(first_requests)
    return {
        "settings": {
            "model": f"dense MLP, x float32 [1, {models.DENSE_FEATURES}], "
            f"{artifact.stat().st_size} bytes",
            "repeats": plan.cold_repeats,
            "inprocess": "python benchmarks/inprocess.py load MODEL: "
            "InferenceSession(MODEL, CPUExecutionProvider) + one run on zeros, fresh process",
            "multiserve": "a fresh server per repeat; the model listed but not loaded; one POST",
            "command": display_argv(argv, {str(root): "MODELS"}),
        },
        "model_bytes": artifact.stat().st_size,
        "multiserve_first_request_s": [round(x, 4) for x in first_requests],
        "inprocess": [{k: round(v, 4) for k, v in r.items()} for r in inprocess],
        "multiserve_first_request_median_s": round(first_median, 4),
        "inprocess_session_and_run_median_s": round(inprocess_total, 4),
        "inprocess_session_median_s": round(median([r["session_s"] for r in inprocess]), 4),
        "ratio": ratio(first_median, inprocess_total),
        "concurrent": concurrent,
    }


def _wait_available(server: ServerProcess) -> None:
    """Until the version is listed (settled, not loaded); the listing never loads."""
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        answer = call(server.port, "GET", f"/models/{MODEL}")
        if answer.status == 200:
            states = {v["version"]: v["state"] for v in answer.json()["versions"]}
            if states.get("1") == "available":
                return
            if states.get("1") not in (None, "settling"):
                raise BenchmarkError(f"{MODEL} is {states.get('1')} before any request")
        time.sleep(0.05)
    raise BenchmarkError(f"{MODEL} never became available:\n{server.log_tail()}")


def _concurrent_first_requests(ctx: Context, root: Path, body: bytes) -> dict[str, Any]:
    n = ctx.plan.cold_concurrency
    server = start_multiserve(ctx, root, name="multiserve-concurrent")
    try:
        _wait_available(server)
        barrier = threading.Barrier(n)
        answers: list[tuple[int, float]] = []
        errors: list[str] = []
        lock = threading.Lock()

        def one() -> None:
            barrier.wait(timeout=30)
            started = time.perf_counter()
            try:
                answer = call(server.port, "POST", PATH, body, JSON_HEADERS, timeout_s=120)
            except OSError as exc:
                with lock:
                    errors.append(str(exc))
                return
            with lock:
                answers.append((answer.status, time.perf_counter() - started))

        threads = [threading.Thread(target=one) for _ in range(n)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=150)
        stats = admin_cache(server.port)["stats"]

        # A warm process: evict, then the next request loads the model again.
        reloads = []
        for _ in range(RELOADS):
            evicted = call(
                server.port, "POST", f"/admin/models/{MODEL}/1/evict", b"", ADMIN_HEADERS
            )
            if evicted.status != 200:
                raise BenchmarkError(f"evict answered {evicted.status}: {evicted.body[:300]!r}")
            time.sleep(0.5)  # the evicted session closes in a worker thread
            started = time.perf_counter()
            answer = call(server.port, "POST", PATH, body, JSON_HEADERS, timeout_s=120)
            if answer.status != 200:
                raise BenchmarkError(f"reload answered {answer.status}: {answer.body[:300]!r}")
            reloads.append(time.perf_counter() - started)
    finally:
        server.stop()
    statuses: dict[str, int] = {}
    for status, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    latencies = [latency for _, latency in answers]
    ctx.log(
        f"cold load: {n} concurrent first requests -> statuses {statuses}, loads "
        f"{stats['loads']}; reload after evict {median(reloads) * 1e3:.0f} ms"
    )
    return {
        "requests": n,
        "statuses": statuses,
        "errors": errors[:5],
        "loads": stats["loads"],
        "latency_max_s": round(max(latencies), 4) if latencies else None,
        "latency_median_s": round(median(latencies), 4) if latencies else None,
        "reload_after_evict_s": [round(x, 4) for x in reloads],
        "reload_after_evict_median_s": round(median(reloads), 4),
    }
