"""What running a Python predictor in a child process (``isolation = "process"``) costs per
request, against the same predictor in the server's process.

    python benchmarks/predictor_hop.py [--requests 2000] [--calls 5000]

Two measurements, each taken in rounds that alternate the two placements so that noise on a
shared machine lands on both:

- **direct**: the backend's models called in this process, no HTTP: ``answer()`` of the
  in-process model against the isolated one (pickle, a socket pair, the child's decode and
  encode, and back). A small JSON payload, and 1 MiB of raw bytes echoed back.
- **HTTP**: one multiserve server (``--allow-python-predictors``) serving the predictor twice,
  in-process and isolated, plus the ``mlp`` ONNX model for scale; one keep-alive client, one
  request at a time, on 127.0.0.1.

Every answer is checked. Prints a table and writes ``benchmarks/results/predictor_hop.json``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multiserve_python import PythonBackend

from benchmarks.harness import (
    HOST,
    RESULTS_DIR,
    BenchmarkError,
    Deadline,
    display_path,
    free_port,
    median,
    package_versions,
    result_header,
    start_server,
    write_json,
)
from examples.make_models import write_mlp_onnx
from multiserve.types import PayloadRequest, Reply

RESULTS_PATH = RESULTS_DIR / "predictor_hop.json"
PREDICTOR = """\
import numpy as np

class Predictor:
    def predict(self, payload):
        if isinstance(payload, bytes):
            return payload
        return {"sum": float(np.sum(payload["x"]))}
"""
SMALL = json.dumps({"x": [5.1, 3.5, 1.4, 0.2]}).encode()
LARGE = bytes(range(256)) * 4096  # 1 MiB
MLP_BODY = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2]]}).encode()


def build(root: Path) -> None:
    for name, config in (("local", ""), ("child", 'isolation = "process"\n')):
        version = root / name / "1"
        version.mkdir(parents=True)
        (version / "config.toml").write_text(config)
        (version / "predictor.py").write_text(PREDICTOR)
    write_mlp_onnx(root / "mlp" / "1" / "model.onnx", seed=2)


def percentiles(samples_ns: Sequence[int]) -> dict[str, float]:
    p50, p99 = np.percentile(np.asarray(samples_ns, dtype=np.float64), [50, 99]) / 1e3
    return {"median_us": round(float(p50), 1), "p99_us": round(float(p99), 1)}


def time_rounds(
    targets: dict[str, Callable[[], None]], count: int, rounds: int, deadline: Deadline
) -> dict[str, dict[str, Any]]:
    """Each target called ``count`` times in all, in ``rounds`` turns, the order rotated each
    round; per target the median and p99 over every call, and each round's median."""
    samples: dict[str, list[int]] = {name: [] for name in targets}
    round_medians: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    per_round = max(count // rounds, 1)
    for round_index in range(rounds):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            deadline.check(f"timing {name}")
            call = targets[name]
            taken = []
            for _ in range(per_round):
                started = time.perf_counter_ns()
                call()
                taken.append(time.perf_counter_ns() - started)
            samples[name] += taken
            round_medians[name].append(median(taken) / 1e3)
    return {
        name: {**percentiles(samples[name]), "round_medians_us": [round(m, 1) for m in meds]}
        for name, meds in round_medians.items()
    }


def direct(root: Path, calls: int, rounds: int, deadline: Deadline) -> dict[str, Any]:
    backend = PythonBackend()
    local = backend.load(root / "local" / "1", {})
    child = backend.load(root / "child" / "1", {"isolation": "process"})
    try:
        small = PayloadRequest(SMALL, "application/json")
        large = PayloadRequest(LARGE, "application/octet-stream")
        expected_small = b'{"sum":10.2}'

        def check(reply: Reply, body: bytes) -> None:
            if reply.status != 200 or reply.body != body:
                raise BenchmarkError(f"wrong answer: {reply.status} {reply.body[:80]!r}")

        for model in (local, child):
            check(model.answer(small), expected_small)
            check(model.answer(large), LARGE)
        return {
            "small_json": time_rounds(
                {
                    "in_process": lambda: check(local.answer(small), expected_small),
                    "isolated": lambda: check(child.answer(small), expected_small),
                },
                calls,
                rounds,
                deadline,
            ),
            "bytes_1MiB": time_rounds(
                {
                    "in_process": lambda: check(local.answer(large), LARGE),
                    "isolated": lambda: check(child.answer(large), LARGE),
                },
                max(calls // 10, rounds),
                rounds,
                deadline,
            ),
        }
    finally:
        local.close()
        child.close()


def over_http(
    root: Path, requests: int, rounds: int, deadline: Deadline, log_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "multiserve",
        "serve",
        "--models",
        str(root),
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--allow-python-predictors",
    ]
    server = start_server("multiserve", argv, port, log_dir, "/readyz", deadline)
    try:
        connection = http.client.HTTPConnection(HOST, port, timeout=30)
        headers = {"Content-Type": "application/json"}

        def post(path: str, body: bytes, check: Callable[[bytes], bool]) -> Callable[[], None]:
            def call() -> None:
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                content = response.read()
                if response.status != 200 or not check(content):
                    raise BenchmarkError(f"{path}: {response.status} {content[:200]!r}")

            return call

        targets = {
            "mlp_onnx": post("/models/mlp/1/predict", MLP_BODY, lambda c: b"probabilities" in c),
            "in_process": post("/models/local/1/predict", SMALL, lambda c: c == b'{"sum":10.2}'),
            "isolated": post("/models/child/1/predict", SMALL, lambda c: c == b'{"sum":10.2}'),
        }
        for call in targets.values():  # loads every model, and warms the connection
            for _ in range(50):
                call()
        results = time_rounds(targets, requests, rounds, deadline)
        connection.close()
        return results, argv
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000, help="HTTP requests per target")
    parser.add_argument("--calls", type=int, default=5000, help="direct calls per placement")
    parser.add_argument("--rounds", type=int, default=5, help="turns the targets take")
    parser.add_argument("--max-seconds", type=float, default=240.0)
    parser.add_argument("--output", type=Path, default=RESULTS_PATH)
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    with tempfile.TemporaryDirectory(prefix="multiserve-hop-") as workdir:
        root = Path(workdir) / "models"
        build(root)
        try:
            print("timing answer() in-process and isolated ...", flush=True)
            direct_results = direct(root, args.calls, args.rounds, deadline)
            print("timing HTTP requests ...", flush=True)
            http_results, server_argv = over_http(
                root, args.requests, args.rounds, deadline, Path(workdir)
            )
        except BenchmarkError as exc:
            print(f"predictor_hop: {exc}", file=sys.stderr)
            return 1
    hop = {
        "direct_small_json_us": round(
            direct_results["small_json"]["isolated"]["median_us"]
            - direct_results["small_json"]["in_process"]["median_us"],
            1,
        ),
        "direct_bytes_1MiB_us": round(
            direct_results["bytes_1MiB"]["isolated"]["median_us"]
            - direct_results["bytes_1MiB"]["in_process"]["median_us"],
            1,
        ),
        "http_us": round(
            http_results["isolated"]["median_us"] - http_results["in_process"]["median_us"], 1
        ),
        "http_ratio": round(
            http_results["isolated"]["median_us"] / http_results["in_process"]["median_us"], 2
        ),
    }
    results = {
        **result_header("predictor_hop"),
        "command": " ".join(["python", "benchmarks/predictor_hop.py", *(argv or sys.argv[1:])]),
        "versions": package_versions(("multiserve", "multiserve-python", "numpy", "orjson")),
        "settings": {
            "requests": args.requests,
            "calls": args.calls,
            "rounds": args.rounds,
            "server_command": " ".join(["python", *server_argv[1:4], "MODELS", *server_argv[5:]]),
            "client": "http.client.HTTPConnection, keep-alive, one request at a time",
            "small_request": SMALL.decode(),
        },
        "direct": direct_results,
        "http": http_results,
        "process_hop": hop,
    }
    print_table(results)
    write_json(args.output, results)
    print(f"\nwrote {display_path(args.output)}")
    return 0


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'measurement':<34}{'median us':>12}{'p99 us':>12}")
    for section in ("direct",):
        for payload, placements in results[section].items():
            for placement, figures in placements.items():
                label = f"answer() {payload}, {placement}"
                print(f"{label:<34}{figures['median_us']:>12}{figures['p99_us']:>12}")
    for placement, figures in results["http"].items():
        label = f"HTTP {placement}"
        print(f"{label:<34}{figures['median_us']:>12}{figures['p99_us']:>12}")
    hop = results["process_hop"]
    print(
        f"\nthe process hop: {hop['direct_small_json_us']} us direct (small JSON), "
        f"{hop['direct_bytes_1MiB_us']} us for 1 MiB each way; over HTTP +{hop['http_us']} us "
        f"({hop['http_ratio']}x the in-process request)"
    )


if __name__ == "__main__":
    sys.exit(main())
