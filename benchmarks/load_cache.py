"""Cheaper misses: what the onnx load cache saves on a reload, per model size.

    .venv/bin/python benchmarks/load_cache.py [--rounds 9]

Writes four-layer MLPs (x float32 [batch, 64] -> Gemm+Relu x 3 -> Gemm -> 10 classes) whose
weights take about 0.3, 3, 30 and 100 MB, and times a load of each (the backend's ``load`` as
the server's `Loader` calls it, the load cache's key and lookup included) three ways, taking
turns within each round: ``off`` (the backend's load without a load cache, what every load
cost before: ONNX Runtime optimises the graph each time), ``first`` (a load that finds no
entry: it optimises, saves the graph and loads the saved one) and ``reload`` (a later load: it
loads the saved graph with optimisation off). Medians over the rounds; ratios
``off / reload`` within the same run. Writes ``benchmarks/results/load_cache.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks.harness import RESULTS_DIR, median, result_header, write_json
from multiserve import load_cache
from multiserve.backends import BackendRegistry
from multiserve.catalog import VersionRecord
from multiserve.derived import DerivedStore
from multiserve.repository.local import LocalRepository
from multiserve.types import LoadContext

FEATURES = 64
CLASSES = 10
SIZES_MB = (0.3, 3.0, 30.0, 100.0)


def write_mlp(path: Path, target_bytes: float, seed: int = 0) -> Path:
    """x [batch, 64] -> 3 x (Gemm + Relu) of one hidden width -> Gemm -> y [batch, 10], the
    width chosen so that the weights take about ``target_bytes``."""
    # 64h + 2h^2 + 10h floats ~= target / 4
    a, b, c = 2.0, FEATURES + CLASSES, -target_bytes / 4
    hidden = max(4, int((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))
    rng = np.random.default_rng(seed)
    dims = [FEATURES, hidden, hidden, hidden, CLASSES]
    nodes, initializers, current = [], [], "x"
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(dims)):
        w = (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)
        bias = np.zeros(fan_out, dtype=np.float32)
        initializers += [
            numpy_helper.from_array(w, f"w{layer}"),
            numpy_helper.from_array(bias, f"b{layer}"),
        ]
        out = "y" if layer == len(dims) - 2 else f"h{layer}"
        gemm_out = out if out == "y" else f"g{layer}"
        nodes.append(helper.make_node("Gemm", [current, f"w{layer}", f"b{layer}"], [gemm_out]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [gemm_out], [out]))
        current = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _timed(load: Callable[[], Any]) -> float:
    started = time.perf_counter()
    load()
    return time.perf_counter() - started


def measure(rounds: int, work: Path) -> list[dict[str, Any]]:
    registry = BackendRegistry()
    backend = registry.get("onnx")
    root = work / "models"
    for size in SIZES_MB:
        write_mlp(root / f"mlp{size:g}" / "1" / "model.onnx", size * 1e6)
    records = {record.name: record for record in LocalRepository(root, registry).scan()}
    store = DerivedStore(work / "derived", max_bytes=0)

    def before(record: VersionRecord) -> None:
        backend.load(record.path, {}).close()  # no load cache at all: every load optimises

    def load(record: VersionRecord, options: dict[str, Any]) -> None:
        opened = load_cache.open_entry(store, record, backend, record.path, options)
        context = LoadContext(
            load_cache=None if opened is None else opened.directory,
            load_cache_hit=bool(opened and opened.hit),
        )
        model = backend.load(record.path, options, context=context)  # type: ignore[call-arg]
        load_cache.close_entry(store, opened, True)
        model.close()

    rows = []
    for size in SIZES_MB:
        record = records[f"mlp{size:g}"]
        times: dict[str, list[float]] = {"off": [], "first": [], "reload": []}
        for round_ in range(rounds):
            times["off"].append(_timed(functools.partial(before, record)))
            # A fresh key each round: ``intra_op_threads`` differs, nothing else does.
            first = {"intra_op_threads": round_ + 1}
            times["first"].append(_timed(functools.partial(load, record, first)))
            times["reload"].append(_timed(functools.partial(load, record, {})))
        medians = {kind: median(values) for kind, values in times.items()}
        rows.append(
            {
                "model_mb": round(record.size_bytes / 1e6, 2),
                **{f"{kind}_ms": round(value * 1000, 2) for kind, value in medians.items()},
                "off_over_reload": round(medians["off"] / medians["reload"], 2),
            }
        )
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9, help="rounds per size (default 9)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="load-cache-") as scratch:
        rows = measure(args.rounds, Path(scratch))
    print("| model | before: every load optimises | first load (saves) | reload (cached) | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model_mb']} MB | {row['off_ms']} ms | {row['first_ms']} ms "
            f"| {row['reload_ms']} ms | {row['off_over_reload']}x |"
        )
    write_json(
        RESULTS_DIR / "load_cache.json",
        {**result_header("load_cache"), "rounds": args.rounds, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
