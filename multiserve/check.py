"""The check a derived model passes before it serves: the same answers as the original within
tolerance, on the version's own sample or on synthetic inputs, and faster by a margin.

The comparisons and the verdict are pure functions of arrays and figures; `time_pair` is the
one place that measures.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multiserve import codecs
from multiserve.errors import MultiserveError
from multiserve.types import Array, ModelMetadata, TensorSpec

REFERENCE_NPZ = "reference.npz"
WARMUP_NPZ = "warmup.npz"
WARMUP_JSON = "warmup.json"
SYNTHETIC_ROWS = 32
SYNTHETIC_DIM = 16
TIMED_ROUNDS = 7
SECONDS_PER_MEASUREMENT = 0.02

TOLERANCE_KEYS = ("max_abs_error", "max_rel_error", "min_argmax_agreement", "min_speedup")


@dataclass(frozen=True, slots=True)
class Tolerance:
    """What a derived model must meet to serve; a bound that is ``None`` is not checked.

    ``max_rel_error`` is relative to the scale of each output (its largest magnitude in the
    original's answers), so that one bound fits logits in the hundreds and probabilities alike.
    """

    max_abs_error: float | None = None
    max_rel_error: float | None = None
    min_argmax_agreement: float | None = None
    min_speedup: float = 1.2


# Per kind. Graph optimisation and export change only rounding, so they are held to it; int8
# quantisation moves every output a little and is held to the class it picks. A graph
# optimised offline is the graph ONNX Runtime would otherwise optimise at every load: it runs
# no faster (its gain is the load), so no speed margin is asked of it; its figures are shown.
DEFAULT_TOLERANCE = {
    "graph": Tolerance(max_rel_error=1e-4, min_speedup=0.0),
    "int8": Tolerance(min_argmax_agreement=0.99, min_speedup=1.2),
    "onnx": Tolerance(max_rel_error=1e-4, min_speedup=1.2),
}


def parse_bound(key: str, value: Any) -> float:
    """A tolerance value from config.toml or the command line; ValueError naming the key."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{key} must be a number, not {value!r}")
    number = float(value)
    if key == "min_argmax_agreement" and not 0.0 <= number <= 1.0:
        raise ValueError(f"min_argmax_agreement must be from 0 to 1 (a share of rows), not {value}")
    if number < 0:
        raise ValueError(f"{key} cannot be negative, not {value}")
    return number


@dataclass(frozen=True, slots=True)
class Figures:
    """What deriving and checking one artifact measured. ``error`` is set when there is no
    derived model to judge, or it could not be checked: it is then why it does not serve."""

    kind: str
    error: str | None = None
    source_bytes: int = 0
    optimized_bytes: int | None = None
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    argmax_agreement: float | None = None
    speedup: float | None = None
    source_seconds: float | None = None  # per call on the sample, best of the timed rounds
    derived_seconds: float | None = None
    source_load_seconds: float | None = None
    derived_load_seconds: float | None = None
    sample: str | None = None  # what the models ran on: a file name, or "synthetic"
    rows: int | None = None
    build_seconds: float | None = None
    backend: str | None = None  # the backend that loads the derived version
    artifact: str | None = None
    load_options: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figures:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def judge(figures: Figures, tolerance: Tolerance) -> tuple[bool, str]:
    """Whether the derived model may serve, and why (or why not), in one sentence. At least
    one accuracy bound must apply to the model's outputs: none is never a pass."""
    if figures.error is not None:
        return False, figures.error
    met: list[str] = []
    failed: list[str] = []
    for name, measured, bound in (
        ("max abs error", figures.max_abs_error, tolerance.max_abs_error),
        ("max rel error", figures.max_rel_error, tolerance.max_rel_error),
    ):
        if bound is None or measured is None:
            continue
        if measured <= bound:
            met.append(f"{name} {measured:.3g} <= {bound:g}")
        else:
            failed.append(f"{name} {measured:.3g} is over {name.replace(' ', '_')} = {bound:g}")
    agreement, least = figures.argmax_agreement, tolerance.min_argmax_agreement
    if least is not None and agreement is not None:
        if agreement >= least:
            met.append(f"argmax agreement {agreement:.2%} >= {least:.2%}")
        else:
            failed.append(
                f"argmax agreement {agreement:.2%} is under min_argmax_agreement = {least:g}"
            )
    if not met and not failed:
        return False, (
            "no tolerance applies to this model's outputs (min_argmax_agreement needs classes "
            "along an output's last axis, or integer outputs; max_abs_error and max_rel_error "
            "need numeric outputs): set the bound that fits in its config.toml"
        )
    speedup = figures.speedup or 0.0
    if speedup < tolerance.min_speedup:
        failed.append(
            f"{speedup:.2f}x the original's speed is under min_speedup = {tolerance.min_speedup:g}"
        )
    if failed:
        return False, "; ".join(failed)
    if not tolerance.min_speedup:
        return True, ", ".join(met) + f" ({speedup:.2f}x the original's speed; none asked)"
    return True, f"{speedup:.2f}x the original's speed, " + ", ".join(met)


class Mismatch(ValueError):
    """The derived model does not take or give what the original does."""


def incompatibility(source: ModelMetadata, derived: ModelMetadata) -> str | None:
    """Why requests that the original accepts might not work the same on the derived model:
    other tensor names or dtypes, or a dimension the original leaves free and it fixes."""
    for what, ours, theirs in (
        ("inputs", source.inputs, derived.inputs),
        ("outputs", source.outputs, derived.outputs),
    ):
        expected = {spec.name: spec for spec in ours}
        found = {spec.name: spec for spec in theirs}
        if set(expected) != set(found):
            return (
                f"the derived model's {what} are {_names(theirs)}; the original's are "
                f"{_names(ours)}"
            )
        for name, spec in expected.items():
            other = found[name]
            if other.dtype != spec.dtype:
                return (
                    f"{what[:-1]} {name!r} is {other.dtype} in the derived model, "
                    f"{spec.dtype} in the original"
                )
            if what == "inputs" and (problem := _narrower(spec, other)) is not None:
                return problem
    return None


def _narrower(spec: TensorSpec, other: TensorSpec) -> str | None:
    if len(spec.shape) != len(other.shape):
        return (
            f"input {spec.name!r} has {len(other.shape)} dimensions in the derived model, "
            f"{len(spec.shape)} in the original"
        )
    for axis, (ours, theirs) in enumerate(zip(spec.shape, other.shape, strict=True)):
        if ours == -1 and theirs != -1:
            return (
                f"input {spec.name!r} takes any size along dimension {axis} in the original "
                f"but only {theirs} in the derived model"
            )
    return None


def _names(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(repr(spec.name) for spec in specs) or "none"


@dataclass(frozen=True, slots=True)
class Differences:
    """How far one model's answers are from another's, over every output; each figure is
    None where no output has it."""

    max_abs_error: float | None
    max_rel_error: float | None
    argmax_agreement: float | None


def compare(
    metadata: ModelMetadata, expected: Mapping[str, Array], actual: Mapping[str, Array]
) -> Differences:
    """``actual`` against ``expected``. The errors are the largest absolute difference of any
    numeric element, and the largest relative to its output's scale; the agreement is the
    smallest share, over outputs, of rows whose top class agrees (outputs with classes along
    their last axis), or of elements that are equal (integer, boolean and string outputs:
    labels). Mismatch when an output is missing or shaped differently."""
    absolute: list[float] = []
    relative: list[float] = []
    agreements: list[float] = []
    for spec in metadata.outputs:
        if spec.name not in actual:
            raise Mismatch(f"the derived model returned no output {spec.name!r}")
        a, b = np.asarray(expected[spec.name]), np.asarray(actual[spec.name])
        if a.shape != b.shape:
            raise Mismatch(
                f"output {spec.name!r} has shape {list(b.shape)} from the derived model, "
                f"{list(a.shape)} from the original"
            )
        if a.size == 0:
            continue
        if a.dtype.kind in "fciub":
            difference, scale = _abs_difference(a, b)
            absolute.append(difference)
            if scale > 0:
                relative.append(difference / scale)
            else:
                relative.append(math.inf if difference else 0.0)
        if a.dtype.kind in "fc":
            if a.ndim >= 2 and a.shape[-1] > 1:
                agreements.append(float(np.mean(np.argmax(a, -1) == np.argmax(b, -1))))
        else:
            agreements.append(float(np.mean(a == b)))
    return Differences(
        max(absolute) if absolute else None,
        max(relative) if relative else None,
        min(agreements) if agreements else None,
    )


def _abs_difference(a: Array, b: Array) -> tuple[float, float]:
    """(largest |a - b|, largest finite |a|): NaN against NaN and equal infinities count as
    equal; NaN against a number as infinitely far."""
    wide = np.complex128 if a.dtype.kind == "c" or b.dtype.kind == "c" else np.float64
    a64, b64 = a.astype(wide), b.astype(wide)
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.abs(a64 - b64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))
    difference = np.where(same, 0.0, np.where(np.isnan(difference), np.inf, difference))
    magnitude = np.abs(a64)
    finite = magnitude[np.isfinite(magnitude)]
    return float(np.max(difference)), float(np.max(finite)) if finite.size else 0.0


def check_sample(sample_dir: Path, metadata: ModelMetadata) -> tuple[str, dict[str, Array]]:
    """The inputs a check runs on, and where they came from: the version's ``reference.npz``
    (else its model directory's), its ``warmup.npz`` or ``warmup.json``, else synthetic.
    Mismatch when the file does not fit the model's inputs."""
    for path in (
        sample_dir / REFERENCE_NPZ,
        sample_dir.parent / REFERENCE_NPZ,
        sample_dir / WARMUP_NPZ,
    ):
        if path.is_file():
            with np.load(path, allow_pickle=False) as arrays:
                named = {name: arrays[name] for name in arrays.files}
            try:
                return path.name, codecs.check_inputs(named, metadata)
            except MultiserveError as exc:
                raise Mismatch(f"{path.name}: {exc.message}") from None
    if (sample_dir / WARMUP_JSON).is_file():
        try:
            body = (sample_dir / WARMUP_JSON).read_bytes()
            return WARMUP_JSON, codecs.decode_json(body, metadata)
        except MultiserveError as exc:
            raise Mismatch(f"{WARMUP_JSON}: {exc.message}") from None
    return "synthetic", synthetic_inputs(metadata)


def sample_files(sample_dir: Path) -> list[Path]:
    """The files `check_sample` may read, that exist."""
    candidates = (
        sample_dir / REFERENCE_NPZ,
        sample_dir.parent / REFERENCE_NPZ,
        sample_dir / WARMUP_NPZ,
        sample_dir / WARMUP_JSON,
    )
    return [path for path in candidates if path.is_file()]


def synthetic_inputs(metadata: ModelMetadata, rows: int = SYNTHETIC_ROWS) -> dict[str, Array]:
    """Seeded inputs shaped from the metadata: ``rows`` along a dynamic first dimension,
    `SYNTHETIC_DIM` along any other dynamic one; standard normal floats, integers 0 or 1."""
    rng = np.random.default_rng(0)
    inputs: dict[str, Array] = {}
    for spec in metadata.inputs:
        shape = tuple(
            dim if dim >= 0 else (rows if axis == 0 else SYNTHETIC_DIM)
            for axis, dim in enumerate(spec.shape)
        )
        if spec.dtype == "string":
            inputs[spec.name] = np.full(shape, "", dtype=np.str_)
        elif spec.dtype == "bool":
            inputs[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        elif spec.numpy_dtype.kind == "f":
            inputs[spec.name] = rng.standard_normal(shape).astype(spec.numpy_dtype)
        else:
            inputs[spec.name] = rng.integers(0, 2, size=shape).astype(spec.numpy_dtype)
    return inputs


def rows_of(inputs: Mapping[str, Array]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim > 0 else 1


Predict = Callable[[Mapping[str, Array]], Mapping[str, Array]]


def time_pair(
    source: Predict, derived: Predict, inputs: Mapping[str, Array], rounds: int = TIMED_ROUNDS
) -> tuple[float, float, float]:
    """(speedup, source seconds per call, derived seconds per call). Each round times both,
    back to back and in alternating order; each model's time is its best round, since
    whatever else runs on the machine can only add to a model's own time."""
    single = max(_timed(source, inputs, 1), _timed(derived, inputs, 1), 1e-6)
    calls = max(1, min(1000, math.ceil(SECONDS_PER_MEASUREMENT / single)))
    source_best = derived_best = math.inf
    for round_ in range(rounds):
        if round_ % 2 == 0:
            source_best = min(source_best, _timed(source, inputs, calls) / calls)
            derived_best = min(derived_best, _timed(derived, inputs, calls) / calls)
        else:
            derived_best = min(derived_best, _timed(derived, inputs, calls) / calls)
            source_best = min(source_best, _timed(source, inputs, calls) / calls)
    return source_best / max(derived_best, 1e-12), source_best, derived_best


def _timed(predict: Predict, inputs: Mapping[str, Array], calls: int) -> float:
    # One call untimed: the first after the other model ran meets its runtime's threads
    # still spinning for work.
    predict(inputs)
    started = time.perf_counter()
    for _ in range(calls):
        predict(inputs)
    return time.perf_counter() - started
