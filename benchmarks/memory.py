"""Section 4: memory.

100 models of ~10 MB each (hard links to one file, so they are separate models to the server
and one file on disk) served through a cache sized for 10 (``--max-models 10`` and a
``--max-memory`` budget of 10 models' worth plus a quarter): the server's peak resident memory
(``VmHWM``, and a 20 ms RSS sampler) against the budget. Then load/evict cycles through the
admin API, with RSS read after every twentieth of them: after the first tenth, RSS should stay
flat.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import numpy as np

from benchmarks import models
from benchmarks.harness import MIB, BenchmarkError, RssSampler, call, median
from benchmarks.suite import (
    ADMIN_HEADERS,
    JSON_HEADERS,
    Context,
    admin_cache,
    display_argv,
    start_multiserve,
)

CLIENT_THREADS = 4
CYCLE_MODELS = 10
# Headroom over ten models' file sizes: a model's cost in the cache is the larger of its files
# and what RSS grew by while it loaded.
BUDGET_FACTOR = 1.25
# After an evict, the session closes in a worker thread: RSS is read once `closing` in
# GET /admin/cache is 0 (the close finished), then after this long for the trim to land.
CLOSE_SETTLE_S = 0.05
CLOSE_TIMEOUT_S = 10.0


def run(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    root = ctx.subdir("memory") / "models"
    source = models.write_dense_onnx(ctx.subdir("memory") / "source.onnx", plan.memory_model_bytes)
    names = [f"m{i:03d}" for i in range(plan.memory_models)]
    models.link_models(source, root, names)
    for name in names:
        (root / name / "1" / "READY").touch()
    file_bytes = source.stat().st_size
    budget = int(plan.memory_cache_models * file_bytes * BUDGET_FACTOR)
    budget_mib = -(-budget // MIB)
    ctx.log(
        f"memory: {plan.memory_models} models of {file_bytes / 1e6:.1f} MB through a cache of "
        f"{plan.memory_cache_models} models / {budget_mib} MiB"
    )
    server = start_multiserve(
        ctx,
        root,
        "--max-models",
        str(plan.memory_cache_models),
        "--max-memory",
        f"{budget_mib}MiB",
        name="multiserve-memory",
    )
    try:
        time.sleep(0.5)
        idle_rss = server.rss_bytes()
        body = models.json_body(models.inputs(models.DENSE_FEATURES, 1)[0])
        statuses: dict[str, int] = {}
        # The first answers of each failing status, to say why they failed.
        failures: dict[str, list[str]] = {}

        def predict(name: str) -> int:
            answer = call(server.port, "POST", f"/models/{name}/1/predict", body, JSON_HEADERS)
            if answer.status != 200:
                seen = failures.setdefault(str(answer.status), [])
                if len(seen) < 3:
                    seen.append(f"{name}: {answer.body[:400].decode(errors='replace')}")
            return answer.status

        started = time.monotonic()
        with (
            RssSampler(server) as sampler,
            concurrent.futures.ThreadPoolExecutor(CLIENT_THREADS) as pool,
        ):
            for _ in range(plan.memory_passes):
                ctx.deadline.check("driving models through the cache")
                for status in pool.map(predict, names):
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
        through_s = time.monotonic() - started
        peak_hwm = server.peak_rss_bytes()
        cache = admin_cache(server.port)
        after_pass_rss = server.rss_bytes()
        ctx.log(
            f"memory: {plan.memory_passes} pass(es) in {through_s:.1f} s, statuses {statuses}; "
            f"peak RSS {peak_hwm / MIB:.0f} MiB (idle {idle_rss / MIB:.0f} MiB), budget "
            f"{budget_mib} MiB; loads {cache['stats']['loads']}, evictions "
            f"{cache['stats']['evictions']}"
        )
        cycles = _cycles(ctx, server.port, names, server.rss_bytes)
        final_cache = admin_cache(server.port)
    finally:
        server.stop()

    return {
        "settings": {
            "models": plan.memory_models,
            "model_bytes": file_bytes,
            "max_models": plan.memory_cache_models,
            "max_memory_mib": budget_mib,
            "passes": plan.memory_passes,
            "client_threads": CLIENT_THREADS,
            "cycles": plan.memory_cycles,
            "cycle_models": CYCLE_MODELS,
            "command": display_argv(server.argv, {str(root): "MODELS"}),
        },
        "budget_bytes": budget_mib * MIB,
        "idle_rss_bytes": idle_rss,
        "peak_rss_bytes": peak_hwm,
        "peak_rss_sampled_bytes": sampler.peak,
        "rss_after_passes_bytes": after_pass_rss,
        "peak_over_budget_mib": round((peak_hwm - budget_mib * MIB) / MIB, 1),
        "statuses": statuses,
        "failure_examples": failures,
        "seconds": round(through_s, 2),
        "cache_after_passes": {
            "models": cache["totals"]["models"],
            "memory_bytes": cache["totals"]["memory_bytes"],
            "stats": cache["stats"],
        },
        "rss_series_mib": _series(sampler.samples),
        "cycles": cycles,
        "cache_after_cycles": {
            "models": final_cache["totals"]["models"],
            "stats": final_cache["stats"],
        },
    }


def _loadable(port: int, names: list[str], count: int) -> tuple[list[str], dict[str, str]]:
    """The first ``count`` of ``names`` that the admin API loads (then evicts again), and why
    the others it tried would not load."""
    chosen: list[str] = []
    refused: dict[str, str] = {}
    for name in names:
        answer = call(port, "POST", f"/admin/models/{name}/1/load", b"", ADMIN_HEADERS)
        call(port, "POST", f"/admin/models/{name}/1/evict", b"", ADMIN_HEADERS)
        if answer.status == 200:
            chosen.append(name)
            if len(chosen) == count:
                break
        else:
            refused[name] = f"{answer.status} {answer.body[:300].decode(errors='replace')}"
    return chosen, refused


def _cycles(ctx: Context, port: int, names: list[str], rss: Any) -> dict[str, Any]:
    """``plan.memory_cycles`` times: load a model, then evict it (admin API)."""
    total = ctx.plan.memory_cycles
    every = max(1, total // 20)
    # Models the server refuses to load (see "refused") cannot show a leak: cycle others.
    names, refused = _loadable(port, names, CYCLE_MODELS)
    if not names:
        raise BenchmarkError(f"no model would load for the load/evict cycles: {refused}")
    _wait_closed(port)
    points: list[tuple[int, float]] = [(0, rss() / MIB)]
    failures: dict[str, int] = {}
    examples: dict[str, str] = {}
    started = time.monotonic()
    for cycle in range(1, total + 1):
        name = names[cycle % len(names)]
        for action in ("load", "evict"):
            answer = call(port, "POST", f"/admin/models/{name}/1/{action}", b"", ADMIN_HEADERS)
            if answer.status != 200:
                key = f"{action} {answer.status}"
                failures[key] = failures.get(key, 0) + 1
                examples.setdefault(key, f"{name}: {answer.body[:300].decode(errors='replace')}")
        if cycle % every == 0 or cycle == total:
            _wait_closed(port)
            points.append((cycle, rss() / MIB))
            ctx.deadline.check("load/evict cycles")
    seconds = time.monotonic() - started
    warm = [(cycle, mib) for cycle, mib in points if cycle >= total // 10]
    head = median([mib for _, mib in warm[:3]])
    tail = median([mib for _, mib in warm[-3:]])
    # Least squares over the readings after the first tenth: a leak shows as a steady slope,
    # allocator noise as steps up and down.
    slope = 0.0
    if len(warm) >= 2:
        xs = np.asarray([cycle for cycle, _ in warm], dtype=np.float64)
        ys = np.asarray([mib for _, mib in warm], dtype=np.float64)
        slope = float(np.polyfit(xs, ys, 1)[0])
    ctx.log(
        f"memory: {total} load/evict cycles over {len(names)} models in {seconds:.1f} s "
        f"(failures {failures or 'none'}); RSS {points[0][1]:.0f} MiB at start, {head:.0f} MiB "
        f"after the first tenth, {tail:.0f} MiB at the end"
    )
    return {
        "cycles": total,
        "models": names,
        "refused_before_cycles": refused,
        "seconds": round(seconds, 2),
        "failures": failures,
        "failure_examples": examples,
        "rss_mib": [[cycle, round(mib, 1)] for cycle, mib in points],
        "rss_start_mib": round(points[0][1], 1),
        "rss_after_first_tenth_mib": round(head, 1),
        "rss_end_mib": round(tail, 1),
        "growth_after_first_tenth_mib": round(tail - head, 1),
        "slope_kib_per_cycle": round(slope * 1024, 2),
        # What the slope adds up to over the cycles after the first tenth: the growth figure
        # the target is judged on (readings move in allocator-sized steps, so a difference of
        # two readings is noisier than the slope through all of them).
        "trend_growth_mib": round(slope * (warm[-1][0] - warm[0][0]), 1) if warm else 0.0,
        "rss_range_after_first_tenth_mib": round(
            max(mib for _, mib in warm) - min(mib for _, mib in warm), 1
        ),
    }


def _wait_closed(port: int) -> None:
    """Until no evicted model is still closing (its memory released), then CLOSE_SETTLE_S."""
    give_up = time.monotonic() + CLOSE_TIMEOUT_S
    while admin_cache(port)["stats"]["closing"] and time.monotonic() < give_up:
        time.sleep(0.02)
    time.sleep(CLOSE_SETTLE_S)


def _series(samples: list[tuple[float, int]]) -> list[list[float]]:
    """RSS over time, at most ~200 points (seconds from the first sample, MiB)."""
    if not samples:
        return []
    step = max(1, len(samples) // 200)
    origin = samples[0][0]
    return [[round(t - origin, 2), round(rss / MIB, 1)] for t, rss in samples[::step]]
