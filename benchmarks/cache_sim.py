"""Know the limit: hit rates of the cache policies on request traces, beside Belady's optimum.

    .venv/bin/python benchmarks/cache_sim.py [--models 100] [--requests 20000] [--seed 0]

Replays seeded traces of requests for ``--models`` models through multiserve's own cache
(`multiserve.cache.ModelCache`, bounded by count, as ``max_models`` bounds it) under each
policy (``lru``, ``tinylfu``) and through Belady's MIN (evicts the model asked for again
furthest in the future: the best any policy that must load every miss can do) and a
hindsight LFU (``lfu*``: evicts the model asked for least over the whole trace, the best a
policy ranking models by frequency can do), for caches of
5% to 50% of the models, and prints the hit-rate table (percent of requests that found their
model loaded; every policy pays the same compulsory misses).

Traces:

- ``zipf(s)``: independent requests, model of rank r asked with probability proportional to
  1/r^s (s = 0.8, 1.0, 1.1, 1.3);
- ``uniform``: every model equally likely;
- ``shifting``: 80% of requests go to a hot set of 10% of the models, the rest uniform; the hot
  set is drawn again every 2,000 requests;
- ``scan``: zipf(1.0), interrupted every 2,000 requests by a scan of 2 x the cache's size of
  models asked for once and never again (a batch job touching many models once).

Writes ``benchmarks/results/cache_sim.json``.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.harness import RESULTS_DIR, result_header, write_json
from multiserve.cache import POLICIES, ModelCache

SKEWS = (0.8, 1.0, 1.1, 1.3)
CACHE_SHARES = (0.05, 0.1, 0.2, 0.3, 0.5)
PHASE = 2000
COLUMNS = (*POLICIES, "lfu*", "belady")


def zipf_trace(models: int, requests: int, skew: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, models + 1) ** skew
    ranks = rng.choice(models, size=requests, p=weights / weights.sum())
    identity = rng.permutation(models)  # which model has which rank: unrelated to its id
    return [int(identity[rank]) for rank in ranks]


def uniform_trace(models: int, requests: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.integers(models, size=requests)]


def shifting_trace(models: int, requests: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    hot_count = max(1, models // 10)
    trace: list[int] = []
    while len(trace) < requests:
        hot = rng.choice(models, size=hot_count, replace=False)
        for _ in range(min(PHASE, requests - len(trace))):
            if rng.random() < 0.8:
                trace.append(int(hot[rng.integers(hot_count)]))
            else:
                trace.append(int(rng.integers(models)))
    return trace


def scan_trace(models: int, requests: int, capacity: int, seed: int) -> list[int]:
    base = zipf_trace(models, requests, 1.0, seed)
    trace: list[int] = []
    one_off = models  # ids past the catalogue's: each asked for exactly once
    for start in range(0, requests, PHASE):
        trace.extend(base[start : start + PHASE])
        for _ in range(2 * capacity):
            trace.append(one_off)
            one_off += 1
    return trace


def policy_hit_rate(trace: Sequence[int], capacity: int, policy: str) -> float:
    """Hits over requests when every miss is loaded and admitted (a model server's misses are
    served), through `ModelCache` exactly as the lifecycle drives it."""
    cache: ModelCache[int, None] = ModelCache(max_items=capacity, policy=policy)
    hits = 0
    for key in trace:
        if key in cache:
            cache.get(key)
            hits += 1
            continue
        cache.get(key)  # the miss, as the lifecycle's lookup records it
        for victim in cache.victims(key, 1):
            cache.remove(victim)
        cache.put(key, None, 1)
    return hits / len(trace)


def belady_hit_rate(trace: Sequence[int], capacity: int) -> float:
    """Belady's MIN with every miss admitted: on a miss with the cache full, evict the cached
    key whose next request is furthest away (or never comes)."""
    never = len(trace)
    upcoming: dict[int, int] = {}
    next_use = [never] * len(trace)
    for index in range(len(trace) - 1, -1, -1):
        next_use[index] = upcoming.get(trace[index], never)
        upcoming[trace[index]] = index
    cached: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), stale entries skipped
    hits = 0
    for index, key in enumerate(trace):
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                far, victim = heapq.heappop(heap)
                if cached.get(victim) == -far:
                    del cached[victim]
                    break
        cached[key] = next_use[index]
        heapq.heappush(heap, (-next_use[index], key))
    return hits / len(trace)


def hindsight_lfu_hit_rate(trace: Sequence[int], capacity: int) -> float:
    """The best a frequency-ranked policy can do: every miss admitted, and on a miss with the
    cache full, evict the cached key (the newcomer included once it is in) asked for least
    over the whole trace. TinyLFU estimates these frequencies online."""
    counts: dict[int, int] = {}
    for key in trace:
        counts[key] = counts.get(key, 0) + 1
    cached: set[int] = set()
    heap: list[tuple[int, int]] = []
    hits = 0
    for key in trace:
        if key in cached:
            hits += 1
            continue
        if len(cached) >= capacity:
            while True:
                _, victim = heapq.heappop(heap)
                if victim in cached:
                    cached.discard(victim)
                    break
        cached.add(key)
        heapq.heappush(heap, (counts[key], key))
    return hits / len(trace)


def traces(models: int, requests: int, capacity: int, seed: int) -> Iterable[tuple[str, list[int]]]:
    for skew in SKEWS:
        yield f"zipf({skew:g})", zipf_trace(models, requests, skew, seed)
    yield "uniform", uniform_trace(models, requests, seed)
    yield "shifting", shifting_trace(models, requests, seed)
    yield "scan", scan_trace(models, requests, capacity, seed)


def simulate(models: int, requests: int, seed: int) -> list[dict[str, Any]]:
    rows = []
    for share in CACHE_SHARES:
        capacity = max(1, round(share * models))
        for name, trace in traces(models, requests, capacity, seed):
            row: dict[str, Any] = {"trace": name, "cache": capacity, "share": share}
            for policy in POLICIES:
                row[policy] = round(100 * policy_hit_rate(trace, capacity, policy), 1)
            row["lfu*"] = round(100 * hindsight_lfu_hit_rate(trace, capacity), 1)
            row["belady"] = round(100 * belady_hit_rate(trace, capacity), 1)
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    shares = sorted({row["share"] for row in rows})
    names = list(dict.fromkeys(row["trace"] for row in rows))
    by = {(row["trace"], row["share"]): row for row in rows}
    header = "| trace | " + " | ".join(f"cache {share:.0%}" for share in shares) + " |"
    lines = [header, "|---|" + "---|" * len(shares)]
    for name in names:
        cells = []
        for share in shares:
            row = by[(name, share)]
            cells.append(" / ".join(f"{row[key]:.1f}" for key in COLUMNS))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rows = simulate(args.models, args.requests, args.seed)
    print(
        f"hit rate %, {' / '.join(COLUMNS)}; {args.models} models, "
        f"{args.requests} requests, seed {args.seed}"
    )
    print(table(rows))
    for policy in POLICIES:
        zipf = [row["belady"] - row[policy] for row in rows if row["trace"].startswith("zipf")]
        print(f"{policy}: largest gap to Belady on zipf {max(zipf):.1f} points")
    write_json(
        RESULTS_DIR / "cache_sim.json",
        {**result_header("cache_sim"), **vars(args), "rows": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
