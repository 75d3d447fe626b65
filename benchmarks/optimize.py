"""Optimise and export on publish: what each derived model buys, on models large enough to
matter.

    .venv/bin/python benchmarks/optimize.py [--quick] [--rounds 3]

Builds two torch models and saves them with ``torch.export`` (``model.pt2``), as a user
publishes them:

- ``mlp``: a 52 MB perceptron (256 -> 2048 -> 3 x (2048 -> 2048) -> 10), trained for 40
  steps on a synthetic 10-class problem, so that its accuracy means something;
- ``encoder``: a small transformer encoder (token embedding, 4 layers of d_model 256, 4 heads,
  mean pooling, 10 classes), seq 32, random weights.

Derives from each, with multiserve's own step (``multiserve.optimize``, as a version with
``export = "onnx"`` / ``optimize = ...`` would): ``onnx`` (the export, served by ONNX Runtime),
then ``graph`` and ``int8`` from the export. Then loads every variant, each in a fresh process
(its memory is what the process grew by when it loaded it), the variants taking turns over
``--rounds`` rounds, and times latency at batch 1 and throughput at batch 32; medians over the
rounds. Accuracy is against the torch original on held-out inputs: argmax agreement, largest
absolute and relative error, and (mlp) the share of labels right.

Targets: int8 at least 1.5x the throughput of the fp32 model at batch 32 on the mlp, with
argmax agreement of at least 99%; the exported model at least as fast under ONNX Runtime as
under torch. Writes ``benchmarks/results/optimize.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.harness import RESULTS_DIR, display_path, median, result_header, write_json

CLASSES = 10
FEATURES = 256
HIDDEN = 2048
VOCAB = 1000
SEQ = 32
EVAL_ROWS = 1024
BATCH = 32


@dataclass(frozen=True)
class Variant:
    model: str
    name: str  # torch, onnx, graph, int8
    backend: str
    directory: Path
    options: dict[str, Any]


# --- the models ---------------------------------------------------------------------------------


def clusters(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A 10-class problem: noisy points around fixed centres (the same centres every call)."""
    centres = np.random.default_rng(7).standard_normal((CLASSES, FEATURES)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=rows)
    noise = 2.0 * rng.standard_normal((rows, FEATURES)).astype(np.float32)
    return (centres[labels] + noise).astype(np.float32), labels


def build_mlp(version_dir: Path, steps: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU()]
    for _ in range(3):
        layers += [torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()]
    layers.append(torch.nn.Linear(HIDDEN, CLASSES))
    module = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        x, y = clusters(rng, 128)
        loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    module.eval()
    print(f"mlp: trained {steps} steps of 128 rows, last loss {loss.item():.3f}")
    _save(module, (torch.zeros(2, FEATURES),), version_dir)
    x, labels = clusters(np.random.default_rng(1), EVAL_ROWS)
    np.savez(version_dir / "reference.npz", input=x[:256])
    return x, labels


def build_encoder(version_dir: Path) -> np.ndarray:
    import torch

    torch.manual_seed(0)

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, 256)
            layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, dropout=0.0)
            self.encoder = torch.nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
            self.head = torch.nn.Linear(256, CLASSES)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            pooled: torch.Tensor = self.encoder(self.embed(ids)).mean(dim=1)
            logits: torch.Tensor = self.head(pooled)
            return logits

    _save(Encoder().eval(), (torch.zeros(2, SEQ, dtype=torch.int64),), version_dir)
    ids = np.random.default_rng(1).integers(0, VOCAB, size=(EVAL_ROWS, SEQ)).astype(np.int64)
    np.savez(version_dir / "reference.npz", ids=ids[:128])
    return ids


def _save(module: Any, example: tuple[Any, ...], version_dir: Path) -> None:
    import torch

    program = torch.export.export(module, example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    version_dir.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(version_dir / "model.pt2"))
    size = (version_dir / "model.pt2").stat().st_size
    print(f"{version_dir.parent.name}: {size / 1e6:.1f} MB model.pt2")


# --- deriving -----------------------------------------------------------------------------------


def derive(kind: str, backend: str, source: Path, sample: Path, out: Path) -> dict[str, Any]:
    """multiserve's own derivation step and check; the figures and the verdict."""
    from multiserve.backends import BackendRegistry
    from multiserve.check import DEFAULT_TOLERANCE, judge
    from multiserve.optimize import Request, derive_and_check

    out.mkdir(parents=True)
    request = Request(kind, backend, str(source), {"device": "cpu"}, str(out), str(sample))
    figures = derive_and_check(request, BackendRegistry())
    if figures.error is not None:
        raise SystemExit(f"deriving {kind} from {source}: {figures.error}")
    accepted, reason = judge(figures, DEFAULT_TOLERANCE[kind])
    print(f"  {kind}: built in {figures.build_seconds:.1f} s; check: {reason}")
    return {
        "build_seconds": figures.build_seconds,
        "check_speedup": figures.speedup,
        "check_accepted": accepted,
        "check_reason": reason,
        "load_options": dict(figures.load_options),
        "bytes": figures.optimized_bytes,
    }


# --- measuring, in a fresh process per variant --------------------------------------------------


def measure_child(args: argparse.Namespace) -> int:
    """Load one variant, report its memory and speed as JSON, save its answers."""
    from multiserve.backends import BackendRegistry
    from multiserve.memory import release_freed_memory, rss_bytes
    from multiserve.types import LoadedModel

    backend = BackendRegistry().get(args.backend)
    inputs = dict(np.load(args.inputs))
    name = next(iter(inputs))
    data = inputs[name]
    release_freed_memory()
    before = rss_bytes() or 0
    started = time.perf_counter()
    model = backend.load(Path(args.measure), json.loads(args.options))
    assert isinstance(model, LoadedModel)
    load_seconds = time.perf_counter() - started
    grown = (rss_bytes() or 0) - before

    def run(rows: np.ndarray) -> Any:
        return model.predict({name: rows})

    one, batch = data[:1], data[:BATCH]
    for _ in range(10):
        run(one)
        run(batch)
    latency = _per_call(run, one, args.seconds)
    throughput = _per_call(run, batch, args.seconds)
    outputs = [next(iter(run(data[i : i + 256]).values())) for i in range(0, len(data), 256)]
    np.save(args.answers, np.concatenate(outputs))
    model.close()
    print(
        json.dumps(
            {
                "memory_bytes": grown,
                "load_seconds": load_seconds,
                "latency_ms": latency * 1e3,
                "rows_per_s": BATCH / throughput,
            }
        )
    )
    return 0


def _per_call(run: Any, rows: np.ndarray, seconds: float) -> float:
    """Median seconds per call over ``seconds`` of calls."""
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        started = time.perf_counter()
        run(rows)
        times.append(time.perf_counter() - started)
    return median(times)


def measure(variant: Variant, inputs: Path, answers: Path, seconds: float) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--measure",
            str(variant.directory),
            "--backend",
            variant.backend,
            "--options",
            json.dumps(variant.options),
            "--inputs",
            str(inputs),
            "--answers",
            str(answers),
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"measuring {variant.model} {variant.name} failed:\n{done.stderr}")
    measured: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return measured


def accuracy(
    original: np.ndarray, answers: np.ndarray, labels: np.ndarray | None
) -> dict[str, Any]:
    difference = np.abs(answers.astype(np.float64) - original.astype(np.float64))
    figures = {
        "argmax_agreement": float(np.mean(answers.argmax(1) == original.argmax(1))),
        "max_abs_error": float(difference.max()),
        "max_rel_error": float(difference.max() / np.abs(original).max()),
    }
    if labels is not None:
        figures["label_accuracy"] = float(np.mean(answers.argmax(1) == labels))
    return figures


# --- the run ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter training and timing")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the variants")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "optimize.json")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--backend", help=argparse.SUPPRESS)
    parser.add_argument("--options", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--answers", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        return measure_child(args)

    rounds = 1 if args.quick else args.rounds
    seconds = 0.5 if args.quick else 2.0
    results: dict[str, Any] = {**result_header("optimize"), "rounds": rounds, "models": {}}
    with tempfile.TemporaryDirectory(prefix="multiserve-optimize-") as scratch:
        root = Path(scratch)
        eval_x, labels = build_mlp(root / "mlp" / "1", steps=15 if args.quick else 40)
        eval_ids = build_encoder(root / "encoder" / "1")
        inputs = {"mlp": root / "mlp-eval.npz", "encoder": root / "encoder-eval.npz"}
        np.savez(inputs["mlp"], input=eval_x)
        np.savez(inputs["encoder"], ids=eval_ids)

        variants: list[Variant] = []
        for model in ("mlp", "encoder"):
            print(f"{model}: deriving")
            original = root / model / "1"
            derived: dict[str, Any] = {}
            derived["onnx"] = derive("onnx", "torch", original, original, root / model / "onnx")
            for kind in ("graph", "int8"):
                exported = root / model / "onnx"
                derived[kind] = derive(kind, "onnx", exported, original, root / model / kind)
            results["models"][model] = {
                "torch_bytes": (original / "model.pt2").stat().st_size,
                "derived": derived,
                "variants": {},
            }
            variants.append(Variant(model, "torch", "torch", original, {"device": "cpu"}))
            for kind in ("onnx", "graph", "int8"):
                options = derived[kind]["load_options"]
                variants.append(Variant(model, kind, "onnx", root / model / kind, options))

        samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for round_ in range(rounds):
            # The variants take turns, each round in another order, so that a slow spell of
            # the machine falls on all of them.
            shift = round_ % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                answers = root / f"{variant.model}-{variant.name}-answers.npy"
                measured = measure(variant, inputs[variant.model], answers, seconds)
                samples.setdefault((variant.model, variant.name), []).append(measured)
                print(
                    f"round {round_ + 1}/{rounds} {variant.model:8} {variant.name:6} "
                    f"b1 {measured['latency_ms']:.3f} ms, b{BATCH} "
                    f"{measured['rows_per_s']:,.0f} rows/s, "
                    f"{measured['memory_bytes'] / 1e6:.0f} MB"
                )

        for (model, name), runs in samples.items():
            answers = np.load(root / f"{model}-{name}-answers.npy")
            original = np.load(root / f"{model}-torch-answers.npy")
            summary: dict[str, Any] = {
                key: median([run[key] for run in runs])
                for key in ("latency_ms", "rows_per_s", "memory_bytes", "load_seconds")
            }
            summary["accuracy"] = accuracy(original, answers, labels if model == "mlp" else None)
            results["models"][model]["variants"][name] = summary

    results["targets"] = targets(results["models"])
    write_json(args.output, results)
    print_table(results)
    print(f"wrote {display_path(args.output)}")
    return 0


def targets(models: dict[str, Any]) -> dict[str, Any]:
    mlp = models["mlp"]["variants"]
    fp32 = max(mlp["torch"]["rows_per_s"], mlp["onnx"]["rows_per_s"])
    int8_speedup = mlp["int8"]["rows_per_s"] / fp32
    agreement = mlp["int8"]["accuracy"]["argmax_agreement"]
    exported = {}
    for model, found in models.items():
        variants = found["variants"]
        exported[model] = {
            "latency_ratio": variants["torch"]["latency_ms"] / variants["onnx"]["latency_ms"],
            "throughput_ratio": variants["onnx"]["rows_per_s"] / variants["torch"]["rows_per_s"],
        }
    return {
        "mlp_int8_speedup_b32_over_fastest_fp32": round(int8_speedup, 2),
        "mlp_int8_argmax_agreement": agreement,
        "mlp_int8_met": int8_speedup >= 1.5 and agreement >= 0.99,
        "exported_speed_over_torch": {
            model: {key: round(value, 2) for key, value in ratios.items()}
            for model, ratios in exported.items()
        },
        "exported_met": all(min(ratios.values()) >= 1.0 for ratios in exported.values()),
    }


def print_table(results: dict[str, Any]) -> None:
    print()
    print(
        f"{'model':8} {'variant':7} {'b1 ms':>8} {'b32 rows/s':>11} {'memory MB':>9} "
        f"{'load ms':>8} {'argmax':>7} {'max abs':>9} {'max rel':>9} {'labels':>7}"
    )
    for model, found in results["models"].items():
        for name, summary in found["variants"].items():
            acc = summary["accuracy"]
            labels = acc.get("label_accuracy")
            print(
                f"{model:8} {name:7} {summary['latency_ms']:8.3f} {summary['rows_per_s']:11,.0f} "
                f"{summary['memory_bytes'] / 1e6:9.1f} {summary['load_seconds'] * 1e3:8.1f} "
                f"{acc['argmax_agreement']:7.2%} {acc['max_abs_error']:9.2e} "
                f"{acc['max_rel_error']:9.2e} "
                f"{'' if labels is None else format(labels, '.2%'):>7}"
            )
    print(json.dumps(results["targets"], indent=2))


if __name__ == "__main__":
    sys.exit(main())
