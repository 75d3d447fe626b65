"""What one model is charged, load after load: the server's measured memory cost of the same
ONNX model over repeated load/evict cycles (through the admin API of a real server process),
against the model's steady cost measured in a fresh process of its own (session created, one
inference run, heap trimmed), and several identical models in a budget that fits two.

    .venv/bin/python -m benchmarks.memory_cost [--features 2500] [--cycles 10]

Targets (issue 11): the charged costs within +-15% of their median; the median within 0.8x to
1.5x the steady cost; three identical models in a budget of 2.4x one of them: two held at a
time, none refused. Results in benchmarks/results/memory_cost.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.harness import (
    REPO_ROOT,
    Deadline,
    call,
    free_port,
    median,
    result_header,
    start_server,
    write_json,
)

TOKEN = "memory-cost-benchmark"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MB = 1000**2
STEADY = """
import sys, numpy as np, onnxruntime as ort
from multiserve.memory import map_large_blocks, release_freed_memory, rss_bytes
from multiserve_onnx import OnnxBackend
map_large_blocks()
OnnxBackend().start()
release_freed_memory(); before = rss_bytes()
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
session.run(None, {"x": np.zeros((1, int(sys.argv[2])), np.float32)})
release_freed_memory(); print(rss_bytes() - before)
"""


def write_model(path: Path, features: int) -> None:
    weights = np.random.default_rng(0).standard_normal((features, features), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, features])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def steady_cost(path: Path, features: int) -> int:
    result = subprocess.run(
        [sys.executable, "-c", STEADY, str(path), str(features)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    )
    return int(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=2500)
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    deadline = Deadline(600)
    with tempfile.TemporaryDirectory() as work:
        root = Path(work) / "models"
        for name in ("a", "b", "c"):
            write_model(root / name / "1" / "model.onnx", args.features)
        file_bytes = (root / "a" / "1" / "model.onnx").stat().st_size
        steady = steady_cost(root / "a" / "1" / "model.onnx", args.features)

        def serve(*extra: str) -> Any:
            port = free_port()
            argv = [sys.executable, "-m", "multiserve", "serve", "--models", str(root)]
            argv += ["--port", str(port), "--admin-token", TOKEN, "--log-level", "warning"]
            return start_server(
                "multiserve", [*argv, *extra], port, Path(work), "/readyz", deadline
            )

        server = serve()
        charged: list[dict[str, Any]] = []
        try:
            for _ in range(args.cycles):
                assert (
                    call(server.port, "POST", "/admin/models/a/1/load", headers=AUTH).status == 200
                )
                (entry,) = call(server.port, "GET", "/admin/cache", headers=AUTH).json()["entries"]
                charged.append(entry["memory"])
                call(server.port, "POST", "/admin/models/a/1/evict", headers=AUTH)
                while call(server.port, "GET", "/admin/cache", headers=AUTH).json()["stats"][
                    "closing"
                ]:
                    deadline.check("waiting for the close")
        finally:
            server.stop()
        costs = [c["bytes"] for c in charged]
        middle = median(costs)
        budget = int(2.4 * middle)
        server = serve("--max-memory", str(budget))
        refusals = 0
        try:
            for name in ("a", "b", "c", "a", "b", "c"):
                status = call(server.port, "POST", f"/admin/models/{name}/1/load", headers=AUTH)
                refusals += status.status == 507
            held = len(call(server.port, "GET", "/admin/cache", headers=AUTH).json()["entries"])
        finally:
            server.stop()
    spread = max(abs(c - middle) / middle for c in costs)
    result = {
        **result_header("memory_cost"),
        "file_bytes": file_bytes,
        "steady_bytes": steady,
        "charged": charged,
        "median_bytes": middle,
        "largest_deviation_from_median": round(spread, 4),
        "median_over_steady": round(middle / steady, 3),
        "budget_bytes": budget,
        "models_held_in_budget": held,
        "refusals_507": refusals,
    }
    write_json(REPO_ROOT / "benchmarks" / "results" / "memory_cost.json", result)
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("machine", "charged")}, indent=2)
    )
    print("charged MB:", ", ".join(f"{c / MB:.2f}" for c in costs))
    print(f"steady MB: {steady / MB:.2f}; file MB: {file_bytes / MB:.2f}")


if __name__ == "__main__":
    main()
