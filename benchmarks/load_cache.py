"""Cheaper misses: what the onnx load cache saves on a reload, per model size.

    .venv/bin/python benchmarks/load_cache.py [--rounds 9]

Writes four-layer MLPs (x float32 [batch, 64] -> Gemm+Relu x 3 -> Gemm -> 10 classes) whose
weights take about 0.3, 3, 30 and 100 MB, and two graph-heavy models of small weights (50 and
200 residual blocks of MatMul, Add, LayerNormalization, Relu: 0.9 and 3.5 MB). Times a load of
each (the backend's ``load`` as the server's `Loader` calls it, the load cache's key and lookup
included) three ways, taking turns within each round:

- ``off``: the backend's load without a load cache, what every load cost before (ONNX Runtime
  optimises the graph each time);
- ``first``: a load that finds no entry (the previous round's is removed first): it optimises,
  saves the graph and loads the saved one;
- ``reload``: a later load: it loads the saved graph with optimisation off.

Medians over the rounds; the ratio ``off / reload`` within the same run. Writes
``benchmarks/results/load_cache.json``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import shutil
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
DEEP_BLOCKS = (50, 200)


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


def write_deep(path: Path, blocks: int, width: int = FEATURES, seed: int = 0) -> Path:
    """A graph-heavy model of small weights: ``blocks`` residual blocks of MatMul, Add,
    LayerNormalization and Relu (x [batch, 64] -> y [batch, 64]), whose many nodes ONNX
    Runtime fuses when it optimises the graph."""
    rng = np.random.default_rng(seed)
    nodes, initializers, current = [], [], "x"
    for i in range(blocks):
        weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"w{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"),
            numpy_helper.from_array(np.ones(width, np.float32), f"g{i}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"beta{i}"),
        ]
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
            helper.make_node("LayerNormalization", [f"a{i}", f"g{i}", f"beta{i}"], [f"n{i}"]),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
            helper.make_node("Add", [f"r{i}", current], [f"h{i}"]),
        ]
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "deep",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
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
    names = []
    for size in SIZES_MB:
        write_mlp(root / f"mlp{size:g}" / "1" / "model.onnx", size * 1e6)
        names.append(f"mlp{size:g}")
    for blocks in DEEP_BLOCKS:
        write_deep(root / f"deep{blocks}" / "1" / "model.onnx", blocks)
        names.append(f"deep{blocks}")
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

    def forget(record: VersionRecord) -> None:
        opened = load_cache.open_entry(store, record, backend, record.path, {})
        if opened is not None:
            load_cache.close_entry(store, opened, False)
            shutil.rmtree(opened.entry, ignore_errors=True)

    rows = []
    for name in names:
        record = records[name]
        times: dict[str, list[float]] = {"off": [], "first": [], "reload": []}
        for _ in range(rounds):
            times["off"].append(_timed(functools.partial(before, record)))
            forget(record)  # the entry an earlier round saved: this load is a first one
            times["first"].append(_timed(functools.partial(load, record, {})))
            times["reload"].append(_timed(functools.partial(load, record, {})))
        medians = {kind: median(values) for kind, values in times.items()}
        rows.append(
            {
                "model": name,
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
            f"| {row['model']} ({row['model_mb']} MB) | {row['off_ms']} ms | {row['first_ms']} ms "
            f"| {row['reload_ms']} ms | {row['off_over_reload']}x |"
        )
    write_json(
        RESULTS_DIR / "load_cache.json",
        {**result_header("load_cache"), "rounds": args.rounds, "rows": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
