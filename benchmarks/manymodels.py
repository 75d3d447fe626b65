"""Many models, little memory: latency, throughput and hit rate when the cache must evict.

    .venv/bin/python benchmarks/manymodels.py [--runs 3] [--seconds 10] [--baseline ../baseline]

Sixty ONNX MLPs of ~300 KB (benchmarks/load_cache.py's ``write_mlp``), served with
``--max-models 10``, under wrk (16 connections, 2 threads) sending seeded sequences of model
paths, one JSON predict request each:

- ``hot8``: 8 models, uniformly (they all fit: no loads after the first);
- ``zipf1.1``: Zipf(1.1) over the 60 (benchmarks/cache_sim.py's ``zipf_trace``);
- ``uniform``: uniformly over the 60.

Servers, each measured with the others paused (SIGSTOP), taking turns within each round:
multiserve from this tree with ``cache_policy`` ``tinylfu`` and ``lru``, and with
``--baseline DIR`` the multiserve checked out in DIR (run from DIR's own .venv; e.g. the main
branch before the fair gate, the load cache and tinylfu), and with ``--peers ray`` Ray Serve's
model multiplexing (benchmarks/peer_apps/ray_serve_onnx.py: Ray installed by the benchmark into
its own virtualenv, one replica, ``max_num_models_per_replica`` 10, the same model files, paths
and JSON; its hit rate and loads are counted by the replica). Per workload and server: medians over
``--runs`` runs of ``--seconds`` each (after a warm-up run) of requests/s, p50, p99 and the
largest latency (wrk's), failed requests, the hit rate over the measured runs (the server's
own cache counters: requests that found their model loaded), and loads per run. Beside it, the
hit rates that LRU, TinyLFU and Belady's optimum get on the same sequence (the wrk threads'
walks interleaved in turn, as long as all the runs together) with the same cache of 10.
Writes ``benchmarks/results/manymodels.json`` (or ``--out NAME``).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cache_sim, peers, wrk
from benchmarks.harness import (
    RESULTS_DIR,
    BenchmarkError,
    Deadline,
    ServerProcess,
    call,
    free_port,
    median,
    only_running,
    result_header,
    start_server,
    write_json,
)
from benchmarks.load_cache import FEATURES, write_mlp
from benchmarks.models import inputs, json_body
from benchmarks.suite import ADMIN_HEADERS, ADMIN_TOKEN, JSON_HEADERS

MODELS = 60
CACHE = 10
HOT = 8
TRACE_LENGTH = 20000
WRK_THREADS = 2
CONNECTIONS = 16
STRIDE = 7919  # each wrk thread's offset into the sequence (benchmarks/wrk.py's Lua)


def workloads(seed: int) -> dict[str, list[int]]:
    return {
        "hot8": cache_sim.uniform_trace(HOT, TRACE_LENGTH, seed),
        "zipf1.1": cache_sim.zipf_trace(MODELS, TRACE_LENGTH, 1.1, seed),
        "uniform": cache_sim.uniform_trace(MODELS, TRACE_LENGTH, seed),
    }


def served_sequence(trace: list[int], requests: int) -> list[int]:
    """The sequence the server sees, approximately: the wrk threads' walks (each from its own
    offset) interleaved in turn."""
    walks = [
        [trace[(thread * STRIDE + step) % len(trace)] for step in range(requests // WRK_THREADS)]
        for thread in range(WRK_THREADS)
    ]
    return [key for group in zip(*walks, strict=True) for key in group]


def cache_stats(port: int) -> dict[str, int]:
    answer = call(port, "GET", "/admin/cache", headers=ADMIN_HEADERS)
    if answer.status != 200:
        raise BenchmarkError(f"GET /admin/cache answered {answer.status}")
    stats: dict[str, int] = answer.json()["stats"]
    return stats


def start(
    name: str, root: Path, log_dir: Path, deadline: Deadline, tree: Path | None, *extra: str
) -> ServerProcess:
    port = free_port()
    python = str(tree / ".venv" / "bin" / "python") if tree is not None else sys.executable
    argv = [python, "-m", "multiserve", "serve", "--models", str(root), "--port", str(port)]
    argv += ["--log-level", "warning", "--admin-token", ADMIN_TOKEN, "--grpc-port", "0"]
    argv += ["--max-models", str(CACHE), "--no-watch", *extra]
    return start_server(name, argv, port, log_dir, "/readyz", deadline, cwd=tree)


def measure(args: argparse.Namespace, work: Path, info: dict[str, Any]) -> dict[str, Any]:
    deadline = Deadline(args.max_seconds)
    root = work / "models"
    for index in range(MODELS):
        path = write_mlp(root / f"m{index}" / "1" / "model.onnx", 3e5, seed=index)
        (path.parent / "READY").touch()
    log_dir = work / "logs"
    log_dir.mkdir()
    bodies = tuple(json_body(x) for x in inputs(FEATURES, count=16))
    configs: list[tuple[str, Path | None, tuple[str, ...]]] = [
        (f"multiserve {policy}", None, ("--cache-policy", policy))
        for policy in args.policies.split(",")
        if policy
    ]
    if args.baseline is not None:
        configs.append((f"baseline ({args.baseline.name})", args.baseline, ()))
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        servers = []
        for name, tree, extra in configs:
            server = start(name, root, log_dir, deadline, tree, *extra)
            stack.callback(server.stop)
            server.pause()
            servers.append(server)
        if "ray" in args.peers.split(","):
            venv = peers.ensure_venv(peers.ray_spec(), deadline, log_dir)
            info["ray"] = {"versions": venv.versions, "settings": peers.RAY_SETTINGS}
            print(f"  starting Ray Serve {venv.versions.get('ray')} ...", file=sys.stderr)
            server = peers.start_ray_serve(venv, root, CACHE, work, free_port(), deadline)
            stack.callback(server.stop)
            server.pause()
            servers.append(server)
        chosen = args.workloads.split(",")
        for workload, trace in workloads(args.seed).items():
            if workload not in chosen:
                continue
            paths = tuple(f"/models/m{key}/1/predict" for key in trace)
            load = wrk.Load(paths[0], bodies, JSON_HEADERS, paths)
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in servers}
            before: dict[str, dict[str, int]] = {}
            for server in servers:  # the warm-up run
                with only_running(server, servers):
                    wrk.run(
                        server.port,
                        load,
                        duration_s=args.warmup,
                        connections=CONNECTIONS,
                        threads=WRK_THREADS,
                    )
                    before[server.name] = cache_stats(server.port)
                server.pause()
            for _ in range(args.runs):
                for server in servers:
                    deadline.check(f"{workload} on {server.name}")
                    with only_running(server, servers):
                        start_stats = cache_stats(server.port)
                        result = wrk.run(
                            server.port,
                            load,
                            duration_s=args.seconds,
                            connections=CONNECTIONS,
                            threads=WRK_THREADS,
                        )
                        end_stats = cache_stats(server.port)
                    server.pause()
                    summary = result.summary()
                    summary["loads"] = end_stats["loads"] - start_stats["loads"]
                    runs[server.name].append(summary)
            block: dict[str, Any] = {"servers": {}}
            total_requests = 0
            for server in servers:
                with only_running(server, servers):
                    after = cache_stats(server.port)
                server.pause()
                hits = after["hits"] - before[server.name]["hits"]
                misses = after["misses"] - before[server.name]["misses"]
                measured = runs[server.name]
                total_requests = max(total_requests, sum(r["requests"] for r in measured))
                block["servers"][server.name] = {
                    "requests_per_s": median([r["requests_per_s"] for r in measured]),
                    "p50_ms": median([r["p50_ms"] for r in measured]),
                    "p99_ms": median([r["p99_ms"] for r in measured]),
                    "max_ms": max(r["max_ms"] for r in measured),
                    "failed": sum(r["failed"] for r in measured),
                    "loads_per_run": median([float(r["loads"]) for r in measured]),
                    "hit_rate": round(100 * hits / max(hits + misses, 1), 1),
                    "runs": measured,
                }
            sequence = served_sequence(trace, max(total_requests, 1000))
            block["simulated_hit_rate"] = {
                "lru": round(100 * cache_sim.policy_hit_rate(sequence, CACHE, "lru"), 1),
                "tinylfu": round(100 * cache_sim.policy_hit_rate(sequence, CACHE, "tinylfu"), 1),
                "belady": round(100 * cache_sim.belady_hit_rate(sequence, CACHE), 1),
            }
            results[workload] = block
            print(f"{workload}: done", file=sys.stderr)
    return results


def table(results: dict[str, Any]) -> str:
    lines = [
        "| workload | server | req/s | p50 ms | p99 ms | max ms | failed | loads/run | hit % "
        "| simulated lru / tinylfu / belady % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, block in results.items():
        sim = block["simulated_hit_rate"]
        simulated = f"{sim['lru']} / {sim['tinylfu']} / {sim['belady']}"
        for name, row in block["servers"].items():
            lines.append(
                f"| {workload} | {name} | {row['requests_per_s']:.0f} | {row['p50_ms']:.1f} "
                f"| {row['p99_ms']:.1f} | {row['max_ms']:.0f} | {row['failed']} "
                f"| {row['loads_per_run']:.0f} | {row['hit_rate']} | {simulated} |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--workloads", default="hot8,zipf1.1,uniform", help="comma-separated, of the three"
    )
    parser.add_argument(
        "--policies", default="tinylfu,lru", help="cache policies of this tree to measure"
    )
    parser.add_argument(
        "--peers", default="", help="peers to measure beside multiserve: 'ray' (Ray Serve)"
    )
    parser.add_argument(
        "--out",
        default="manymodels.json",
        help="the results file's name, in benchmarks/results/",
    )
    parser.add_argument("--max-seconds", type=float, default=1800.0)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a multiserve checkout with its own .venv, measured beside this tree",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    unknown = set(filter(None, args.peers.split(","))) - {"ray"}
    if unknown:
        raise SystemExit(f"unknown peers: {', '.join(sorted(unknown))} (known: ray)")
    info: dict[str, Any] = {}
    # A short name: Ray's Unix sockets live under its temp dir (108 bytes at most).
    with tempfile.TemporaryDirectory(prefix="mm-") as scratch:
        results = measure(args, Path(scratch), info)
    print(table(results))
    baseline = None
    if args.baseline is not None:
        baseline = {"path": str(args.baseline), "revision": git_revision_of(args.baseline)}
    write_json(
        RESULTS_DIR / Path(args.out).name,
        {
            **result_header("manymodels"),
            "settings": {
                "models": MODELS,
                "max_models": CACHE,
                "connections": CONNECTIONS,
                "wrk_threads": WRK_THREADS,
                "runs": args.runs,
                "seconds": args.seconds,
                "warmup_s": args.warmup,
                "seed": args.seed,
            },
            "baseline": baseline,
            "peers": info,
            "wall_s": round(time.monotonic() - started, 1),
            "results": results,
        },
    )
    return 0


def git_revision_of(tree: Path) -> str:
    completed = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return completed.stdout.strip() or "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
