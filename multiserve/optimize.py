"""Derived artifacts and their checks: ``optimize = "graph" | "int8"`` and ``export = "onnx"``
in a model's config.toml.

When such a version loads, the backend that loads it derives a faster artifact (a `Deriver`)
in a child process, which then runs the derived model beside the original on the version's
``reference.npz`` / ``warmup.npz`` (or on inputs made from the metadata) and times both. The
derived model serves only if its answers are within tolerance and it is faster by a margin;
otherwise the original serves and the reason is shown. The result, artifact and figures, is
kept in a `DerivedStore`, keyed by the source files' content, the runtime and the machine, so
later loads, evictions and restarts reuse it without deriving again.

The child process keeps the server's memory accounting true (a load's growth of the process
is its model's cost; an exporter's imports and scratch memory are not), keeps a crash in an
exporter or quantiser from taking the server down, and keeps its Python work from holding the
GIL that the serving threads need. ``multiserve optimize`` runs the same step in-process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multiserve import codecs
from multiserve.backends import BackendRegistry
from multiserve.catalog import Ident, VersionRecord
from multiserve.derived import (
    DerivedStore,
    checksum_mismatch,
    content_sha256,
    derivation_key,
    directory_digest,
    write_checksum,
)
from multiserve.errors import ModelLoadFailed, MultiserveError
from multiserve.repository.classify import classify
from multiserve.types import Array, Backend, Deriver, LoadedModel, ModelMetadata, TensorSpec

logger = logging.getLogger("multiserve.optimize")

OPTIMIZE_KINDS = ("graph", "int8")
EXPORT_KINDS = ("onnx",)
TOLERANCE_KEYS = ("max_abs_error", "min_argmax_agreement", "min_speedup")
# config.toml keys this module reads; the backends never see them.
KEYS = ("optimize", "export", *TOLERANCE_KEYS)

CONFIG_FILE = "config.toml"
DERIVATION_FILE = "derivation.json"
LOG_FILE = "derive.log"
REFERENCE_NPZ = "reference.npz"
WARMUP_NPZ = "warmup.npz"
WARMUP_JSON = "warmup.json"
# Files of a version directory that are not the model itself.
NOT_MODEL = frozenset(
    {CONFIG_FILE, DERIVATION_FILE, LOG_FILE, REFERENCE_NPZ, WARMUP_NPZ, WARMUP_JSON, "READY"}
)
SYNTHETIC_ROWS = 32
SYNTHETIC_DIM = 16
TIMED_ROUNDS = 7
SECONDS_PER_MEASUREMENT = 0.02
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True, slots=True)
class Tolerance:
    """What a derived model must meet to serve. ``None``: that bound is not checked."""

    max_abs_error: float | None
    min_argmax_agreement: float | None
    min_speedup: float


# Per kind. Graph optimisation and export change only rounding, so they are held to it; int8
# quantisation moves every output a little and is held to the class it picks. A graph
# optimised offline is the graph ONNX Runtime would otherwise optimise at every load: it runs
# no faster, its gain is the load, so no speed margin is asked of it (its figures are shown).
DEFAULT_TOLERANCE = {
    "graph": Tolerance(max_abs_error=1e-4, min_argmax_agreement=None, min_speedup=0.0),
    "int8": Tolerance(max_abs_error=None, min_argmax_agreement=0.99, min_speedup=1.2),
    "onnx": Tolerance(max_abs_error=1e-4, min_argmax_agreement=None, min_speedup=1.2),
}


@dataclass(frozen=True, slots=True)
class Plan:
    """What a version's config.toml asks for: the kinds to derive, in order (an export
    first, so that an exported model can then be optimised), and any tolerance it sets."""

    steps: tuple[str, ...]
    overrides: Mapping[str, float] = field(default_factory=dict)

    def tolerance(self, kind: str) -> Tolerance:
        return dataclasses.replace(DEFAULT_TOLERANCE[kind], **self.overrides)


def split_options(options: Mapping[str, Any]) -> tuple[Plan | None, dict[str, Any]]:
    """The plan in a version's options, and the options left for its backend. ValueError
    with a message naming the key when a value is not allowed."""
    rest = {key: value for key, value in options.items() if key not in KEYS}
    optimize = _choice(options, "optimize", OPTIMIZE_KINDS)
    export = _choice(options, "export", EXPORT_KINDS)
    overrides: dict[str, float] = {}
    for key in TOLERANCE_KEYS:
        if key in options:
            overrides[key] = _number(key, options[key])
    steps = tuple(kind for kind in (export, optimize) if kind is not None)
    if not steps:
        if overrides:
            raise ValueError(
                f"{', '.join(overrides)} set, but neither optimize nor export: "
                'add optimize = "graph" | "int8" or export = "onnx"'
            )
        return None, rest
    return Plan(steps, overrides), rest


def _choice(options: Mapping[str, Any], key: str, kinds: tuple[str, ...]) -> str | None:
    value = options.get(key)
    if value is None or value == "none":
        return None
    if value not in kinds:
        allowed = ", ".join(f'"{kind}"' for kind in (*kinds, "none"))
        raise ValueError(f"{key} must be one of {allowed}, not {value!r}")
    return str(value)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{key} must be a number, not {value!r}")
    number = float(value)
    if key == "min_argmax_agreement" and not 0.0 <= number <= 1.0:
        raise ValueError(f"min_argmax_agreement must be from 0 to 1 (a share of rows), not {value}")
    if number < 0:
        raise ValueError(f"{key} cannot be negative, not {value}")
    return number


# --- the figures and the verdict ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Figures:
    """What deriving and checking one artifact measured. ``error`` is set when there is no
    derived model to judge, or it could not be checked; it is then the reason it does not
    serve."""

    kind: str
    error: str | None = None
    source_bytes: int = 0
    optimized_bytes: int | None = None
    max_abs_error: float | None = None
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
    """Whether the derived model may serve, and why (or why not), in one sentence."""
    if figures.error is not None:
        return False, figures.error
    met: list[str] = []
    failed: list[str] = []
    error, agreement = figures.max_abs_error, figures.argmax_agreement
    if tolerance.max_abs_error is not None and error is not None:
        if error <= tolerance.max_abs_error:
            met.append(f"max abs error {error:.3g} <= {tolerance.max_abs_error:g}")
        else:
            failed.append(f"max abs error {error:.3g} is over max_abs_error = {tolerance.max_abs_error:g}")
    if tolerance.min_argmax_agreement is not None and agreement is not None:
        bound = tolerance.min_argmax_agreement
        if agreement >= bound:
            met.append(f"argmax agreement {agreement:.2%} >= {bound:.2%}")
        else:
            failed.append(f"argmax agreement {agreement:.2%} is under min_argmax_agreement = {bound:g}")
    if not met and not failed:
        return False, (
            "no tolerance applies to this model's outputs (min_argmax_agreement needs classes "
            "along an output's last axis, or integer outputs; max_abs_error needs numeric "
            "outputs): set the bound that fits in its config.toml"
        )
    speedup = figures.speedup or 0.0
    if speedup < tolerance.min_speedup:
        failed.append(f"{speedup:.2f}x the original's speed is under min_speedup = {tolerance.min_speedup:g}")
    if failed:
        return False, "; ".join(failed)
    return True, f"{speedup:.2f}x the original's speed, " + ", ".join(met)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One derivation as ``GET /models/{name}/{version}`` shows it."""

    figures: Figures
    accepted: bool
    reason: str
    reused: bool

    def to_json(self) -> dict[str, Any]:
        f = self.figures
        return {
            "kind": f.kind,
            "accepted": self.accepted,
            "reason": self.reason,
            "speedup": _rounded(f.speedup, 3),
            "max_abs_error": _significant(f.max_abs_error),
            "argmax_agreement": _rounded(f.argmax_agreement, 6),
            "source_bytes": f.source_bytes,
            "optimized_bytes": f.optimized_bytes,
            "backend": f.backend,
            "sample": f.sample,
            "rows": f.rows,
            "seconds_per_call": {
                "source": _significant(f.source_seconds),
                "derived": _significant(f.derived_seconds),
            },
            "load_seconds": {
                "source": _rounded(f.source_load_seconds, 6),
                "derived": _rounded(f.derived_load_seconds, 6),
            },
            "build_seconds": _rounded(f.build_seconds, 3),
            "reused": self.reused,
        }


def block_name(kind: str) -> str:
    return "exported" if kind in EXPORT_KINDS else "optimized"


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _significant(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(f"{value:.4g}")


# --- the check -----------------------------------------------------------------------------------


class Mismatch(ValueError):
    """The derived model does not answer the same questions the same way."""


def incompatibility(source: ModelMetadata, derived: ModelMetadata) -> str | None:
    """Why requests that the original accepts might not work the same on the derived model."""
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
                return f"{what[:-1]} {name!r} is {other.dtype} in the derived model, {spec.dtype} in the original"
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


def compare(
    metadata: ModelMetadata, expected: Mapping[str, Array], actual: Mapping[str, Array]
) -> tuple[float | None, float | None]:
    """(max abs error, argmax agreement) of ``actual`` against ``expected``, over every
    output. The error is the largest absolute difference of any numeric element; the
    agreement is the smallest share, over outputs, of rows whose top class agrees (an output
    with classes along its last axis) or of elements that are equal (integer, boolean and
    string outputs: labels). Either is None where no output has it."""
    errors: list[float] = []
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
        if a.dtype.kind in "fc":
            errors.append(_max_abs_difference(a, b))
            if a.ndim >= 2 and a.shape[-1] > 1:
                agreements.append(float(np.mean(np.argmax(a, -1) == np.argmax(b, -1))))
        elif a.dtype.kind in "iub":
            errors.append(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
            agreements.append(float(np.mean(a == b)))
        else:
            agreements.append(float(np.mean(a == b)))
    return (max(errors) if errors else None, min(agreements) if agreements else None)


def _max_abs_difference(a: Array, b: Array) -> float:
    a64, b64 = a.astype(np.complex128 if a.dtype.kind == "c" else np.float64), b.astype(
        np.complex128 if b.dtype.kind == "c" else np.float64
    )
    with np.errstate(invalid="ignore", over="ignore"):
        difference = np.abs(a64 - b64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))  # equal infinities, NaN for NaN
    difference = np.where(same, 0.0, np.where(np.isnan(difference), np.inf, difference))
    return float(np.max(difference))


def check_sample(sample_dir: Path, metadata: ModelMetadata) -> tuple[str, dict[str, Array]]:
    """The inputs a check runs on, and where they came from: the version's ``reference.npz``
    (else its model directory's), its ``warmup.npz`` or ``warmup.json``, else synthetic."""
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
                raise Mismatch(f"{path}: {exc.message}") from None
    if (sample_dir / WARMUP_JSON).is_file():
        try:
            return WARMUP_JSON, codecs.decode_json((sample_dir / WARMUP_JSON).read_bytes(), metadata)
        except MultiserveError as exc:
            raise Mismatch(f"{sample_dir / WARMUP_JSON}: {exc.message}") from None
    return "synthetic", synthetic_inputs(metadata)


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


def _rows(inputs: Mapping[str, Array]) -> int:
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


# --- deriving and checking (in the child process, or in `multiserve optimize`) ------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One derivation: ``kind`` of the version in ``source`` (loaded by ``backend`` with
    ``options``), written into ``out``, checked on the sample found in ``sample_dir``."""

    kind: str
    backend: str
    source: str
    options: Mapping[str, Any]
    out: str
    sample_dir: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_bytes(directory: Path) -> int:
    """The bytes of a version's model: its files less configuration, samples and checksums."""
    return sum(
        path.stat().st_size
        for path in directory.rglob("*")
        if path.is_file() and path.name not in NOT_MODEL and not path.name.endswith(".sha256")
    )


def derive_and_check(request: Request, registry: BackendRegistry) -> Figures:
    """Derive ``request.kind`` into ``request.out`` and check it against the original. Never
    raises: what went wrong is the figures' ``error``."""
    kind, source, out = request.kind, Path(request.source), Path(request.out)
    source_bytes = model_bytes(source)
    try:
        backend = registry.get(request.backend)
    except MultiserveError as exc:
        return Figures(kind, error=exc.message, source_bytes=source_bytes)
    if not isinstance(backend, Deriver) or kind not in backend.derivations:
        return Figures(kind, error=cannot_derive(request.backend, backend, kind), source_bytes=source_bytes)
    started = time.perf_counter()
    try:
        load_options = dict(backend.derive(kind, source, dict(request.options), out))
    except Exception as exc:
        logger.debug("deriving %s failed", kind, exc_info=True)
        for leftover in out.iterdir():  # whatever it wrote before failing
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        return Figures(
            kind,
            error=f"deriving {kind} failed: {type(exc).__name__}: {_first_line(exc)}",
            source_bytes=source_bytes,
        )
    build_seconds = time.perf_counter() - started
    files = [path.name for path in out.iterdir()]
    try:
        found = registry.detect(out, files)
    except ValueError as exc:
        found, problem = None, str(exc)
    else:
        problem = "it wrote no artifact that an installed backend loads"
    if found is None:
        return Figures(kind, error=f"deriving {kind}: {problem}", source_bytes=source_bytes)
    target_name, artifact = found
    if artifact:
        write_checksum(out / artifact)
    (out / CONFIG_FILE).write_text(derived_config(kind, load_options))
    _copy_samples(Path(request.sample_dir), out)
    figures = Figures(
        kind,
        source_bytes=source_bytes,
        optimized_bytes=model_bytes(out),
        build_seconds=build_seconds,
        backend=target_name,
        artifact=artifact or None,
        load_options=load_options,
    )
    try:
        target = registry.get(target_name)
        measured = _check(backend, source, request.options, target, out, load_options, Path(request.sample_dir))
    except Exception as exc:
        logger.debug("checking %s failed", kind, exc_info=True)
        message = exc.message if isinstance(exc, MultiserveError) else _first_line(exc)
        if not isinstance(exc, Mismatch | MultiserveError):
            message = f"{type(exc).__name__}: {message}"
        return dataclasses.replace(figures, error=f"the check of {kind} failed: {message}")
    return dataclasses.replace(figures, **measured)


def _check(
    backend: Backend,
    source: Path,
    options: Mapping[str, Any],
    target: Backend,
    out: Path,
    load_options: Mapping[str, Any],
    sample_dir: Path,
) -> dict[str, Any]:
    started = time.perf_counter()
    original = backend.load(source, options)
    source_load = time.perf_counter() - started
    try:
        started = time.perf_counter()
        derived = target.load(out, load_options)
        derived_load = time.perf_counter() - started
        try:
            problem = incompatibility(original.metadata, derived.metadata)
            if problem is not None:
                raise Mismatch(problem)
            sample, inputs = check_sample(sample_dir, original.metadata)
            expected = original.predict(inputs)
            actual = derived.predict(inputs)
            max_abs_error, agreement = compare(original.metadata, expected, actual)
            speedup, source_seconds, derived_seconds = time_pair(
                original.predict, derived.predict, inputs
            )
        finally:
            derived.close()
    finally:
        original.close()
    return {
        "max_abs_error": max_abs_error,
        "argmax_agreement": agreement,
        "speedup": speedup,
        "source_seconds": source_seconds,
        "derived_seconds": derived_seconds,
        "source_load_seconds": source_load,
        "derived_load_seconds": derived_load,
        "sample": sample,
        "rows": _rows(inputs),
    }


def cannot_derive(name: str, backend: Backend, kind: str) -> str:
    kinds = sorted(backend.derivations) if isinstance(backend, Deriver) else []
    can = f"it derives {', '.join(kinds)}" if kinds else "it derives nothing"
    hint = ' (export = "onnx" first)' if kind in OPTIMIZE_KINDS and "onnx" in kinds else ""
    return f"backend {name!r} cannot derive {kind!r}: {can}{hint}"


def derived_config(kind: str, load_options: Mapping[str, Any]) -> str:
    """The config.toml of a derived version: the options it loads with, and no further
    derivation (a model directory's ``optimize`` must not apply to it again)."""
    lines = [
        f"# Derived by multiserve optimize ({kind}) and checked against its source;",
        f"# {DERIVATION_FILE} holds the figures.",
        'optimize = "none"',
        'export = "none"',
    ]
    for key, value in load_options.items():
        lines.append(f"{key} = {_toml_value(key, value)}")
    return "\n".join(lines) + "\n"


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float | bool) for v in value):
        return "[" + ", ".join(_toml_value(key, v) for v in value) + "]"
    raise ValueError(f"load option {key!r} = {value!r} cannot be written to config.toml")


def _copy_samples(sample_dir: Path, out: Path) -> None:
    for name in (REFERENCE_NPZ, WARMUP_NPZ, WARMUP_JSON):
        if (sample_dir / name).is_file() and not (out / name).exists():
            shutil.copyfile(sample_dir / name, out / name)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:500]


# --- offline: `multiserve optimize` -------------------------------------------------------------


class UsageError(ValueError):
    """The command cannot start (exit status 2)."""


def optimize_offline(
    src: Path,
    out: Path,
    kind: str,
    overrides: Mapping[str, float],
    registry: BackendRegistry | None = None,
) -> tuple[Figures, bool, str]:
    """Derive ``kind`` from the version directory ``src`` and check it; when it passes,
    write it as the version directory ``out`` (with its ``.sha256``), ready to drop into a
    repository. Returns (figures, accepted, reason); UsageError when it cannot start."""
    if registry is None:
        registry = BackendRegistry()
    if kind not in DEFAULT_TOLERANCE:
        raise UsageError(f"--kind must be one of {', '.join(DEFAULT_TOLERANCE)}, not {kind!r}")
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists: choose a new directory for the derived version")
    filenames = [path.name for path in src.iterdir() if path.is_file()]
    found = classify(
        registry, src, filenames, _config(src.parent / CONFIG_FILE), _config(src / CONFIG_FILE)
    )
    if found.problem is not None:
        raise UsageError(f"{src}: {found.problem}")
    if found.backend is None:
        raise UsageError(f"{src} holds no model artifact (model.onnx, model.pt, model.pt2)")
    try:
        plan, options = split_options(found.options)
    except ValueError as exc:
        raise UsageError(f"{src / CONFIG_FILE}: {exc}") from None
    for key, value in overrides.items():
        _number(key, value)
    configured = plan.overrides if plan is not None else {}
    tolerance = dataclasses.replace(DEFAULT_TOLERANCE[kind], **{**configured, **overrides})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        request = Request(kind, found.backend, str(src), options, str(staging), str(src))
        figures = derive_and_check(request, registry)
        accepted, reason = judge(figures, tolerance)
        if accepted:
            (staging / DERIVATION_FILE).write_text(json.dumps(figures.to_json(), indent=2))
            if out.exists():
                out.rmdir()
            os.replace(staging, out)
        return figures, accepted, reason
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def report_lines(src: Path, figures: Figures, accepted: bool, reason: str) -> list[str]:
    """What `multiserve optimize` prints: the verdict, then the figures."""
    verdict = "accepted" if accepted else "REJECTED"
    lines = [f"{figures.kind} of {src}: {verdict}: {reason}"]
    f = figures
    if f.source_seconds is not None and f.derived_seconds is not None:
        lines.append(
            f"  speed      {f.source_seconds * 1e3:.3f} ms -> {f.derived_seconds * 1e3:.3f} ms "
            f"per call ({f.speedup or 0:.2f}x), {f.rows} rows of {f.sample} inputs"
        )
    if f.max_abs_error is not None or f.argmax_agreement is not None:
        error = "n/a" if f.max_abs_error is None else f"{f.max_abs_error:.3g}"
        agreement = "n/a" if f.argmax_agreement is None else f"{f.argmax_agreement:.2%}"
        lines.append(f"  accuracy   max abs error {error}, argmax agreement {agreement}")
    if f.optimized_bytes is not None:
        lines.append(f"  size       {f.source_bytes:,} -> {f.optimized_bytes:,} bytes")
    if f.source_load_seconds is not None and f.derived_load_seconds is not None:
        lines.append(
            f"  load       {f.source_load_seconds * 1e3:.1f} ms -> "
            f"{f.derived_load_seconds * 1e3:.1f} ms"
        )
    if f.build_seconds is not None:
        lines.append(f"  built in   {f.build_seconds:.2f} s ({f.backend} loads it)")
    return lines


# --- in the server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Loadable:
    """What the lifecycle loads: a backend, a version directory, its options."""

    name: str
    backend: Backend
    path: Path
    options: dict[str, Any]


class Optimizer:
    """The lifecycle's step between finding a version's files and loading them: builds or
    reuses the derived artifacts its config.toml asks for and says which one to load.

    `prepare` is blocking (it runs in the load's worker thread) and thread-safe; nothing it
    does can fail a load except an invalid config.toml value: anything else leaves the
    original to serve, with the reason shown by `describe`.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        store: DerivedStore | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self.store = store if store is not None else DerivedStore()
        self.timeout_s = timeout_s
        self.builds = 0  # derivations run (not reused) since start
        self._lock = threading.Lock()
        self._outcomes: OrderedDict[Ident, dict[str, Outcome]] = OrderedDict()
        self._children: set[subprocess.Popen[bytes]] = set()
        self._closed = False

    def prepare(
        self, record: VersionRecord, backend: Backend, path: Path, options: Mapping[str, Any]
    ) -> tuple[Backend, Path, dict[str, Any]]:
        """The backend, directory and options to load ``record`` from: a derived version
        that passed its check, else the original (``options`` less this module's keys)."""
        what = f"{record.name} version {record.version}"
        try:
            plan, rest = split_options(options)
        except ValueError as exc:
            raise ModelLoadFailed(f"{what}: {exc}") from None
        if plan is None:
            self._remember(record.ident, None)
            return backend, path, rest
        if record.artifact is not None and checksum_mismatch(path / record.artifact):
            return backend, path, rest  # the load verifies it and fails with the reason
        current = Loadable(record.backend or "", backend, path, rest)
        outcomes: dict[str, Outcome] = {}
        for kind in plan.steps:
            outcome, derived = self._step(record, kind, current, path, plan.tolerance(kind))
            outcomes[block_name(kind)] = outcome
            level = logging.INFO if outcome.accepted else logging.WARNING
            verdict = "serves" if outcome.accepted else "does not serve"
            logger.log(level, "%s: %s %s: %s", what, kind, verdict, outcome.reason)
            if derived is not None:
                current = derived
        self._remember(record.ident, outcomes)
        return current.backend, current.path, current.options

    def describe(self, record: VersionRecord) -> dict[str, Any]:
        """The ``optimized`` / ``exported`` blocks of a loaded version."""
        with self._lock:
            outcomes = self._outcomes.get(record.ident)
        if not outcomes:
            return {}
        return {name: outcome.to_json() for name, outcome in outcomes.items()}

    def close(self) -> None:
        """Stop every derivation running now (the loads that wait on them serve their
        originals); no new one starts."""
        with self._lock:
            self._closed = True
            children = list(self._children)
        for child in children:
            if child.poll() is None:
                child.kill()

    def _remember(self, ident: Ident, outcomes: dict[str, Outcome] | None) -> None:
        with self._lock:
            if outcomes is None:
                self._outcomes.pop(ident, None)
                return
            self._outcomes[ident] = outcomes
            self._outcomes.move_to_end(ident)
            while len(self._outcomes) > 4096:
                self._outcomes.popitem(last=False)

    def _step(
        self,
        record: VersionRecord,
        kind: str,
        source: Loadable,
        sample_dir: Path,
        tolerance: Tolerance,
    ) -> tuple[Outcome, Loadable | None]:
        if not isinstance(source.backend, Deriver) or kind not in source.backend.derivations:
            figures = Figures(kind, error=cannot_derive(source.name, source.backend, kind))
            return Outcome(figures, False, figures.error or "", False), None
        key = derivation_key(
            f"{kind}:{source.name}",
            directory_digest(source.path),
            {"options": source.options, "sample": _sample_digest(sample_dir)},
        )
        entry = self.store.path(record.name, record.version, kind, key)
        figures = self._reuse(entry)
        reused = figures is not None
        if figures is None:
            figures = self._build(kind, source, sample_dir, entry)
        accepted, reason = judge(figures, tolerance)
        if not accepted or figures.backend is None:
            return Outcome(figures, False, reason, reused), None
        try:
            backend = self.registry.get(figures.backend)
        except MultiserveError as exc:
            return Outcome(figures, False, exc.message, reused), None
        outcome = Outcome(figures, True, reason, reused)
        return outcome, Loadable(figures.backend, backend, entry, dict(figures.load_options))

    def _reuse(self, entry: Path) -> Figures | None:
        if not self.store.lookup(entry):
            return None
        try:
            return Figures.from_json(json.loads((entry / DERIVATION_FILE).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("%s is unreadable (%s): deriving it again", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def _build(self, kind: str, source: Loadable, sample_dir: Path, entry: Path) -> Figures:
        staging = self.store.staging()
        request = Request(kind, source.name, str(source.path), source.options, str(staging), str(sample_dir))
        keep = False
        try:
            figures, keep = self._run_child(request, staging)
            if keep:
                (staging / DERIVATION_FILE).write_text(json.dumps(figures.to_json(), indent=2))
                self.store.commit(staging, entry)
            return figures
        finally:
            if not keep:
                self.store.discard(staging)

    def _run_child(self, request: Request, staging: Path) -> tuple[Figures, bool]:
        """Run the derivation in a child process: (its figures, whether to keep them)."""
        kind = request.kind
        command = [sys.executable, "-m", "multiserve.optimize", json.dumps(request.to_json())]
        with tempfile.TemporaryFile() as log:
            with self._lock:
                if self._closed:
                    return Figures(kind, error="the server is shutting down"), False
                child = subprocess.Popen(
                    command, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=_child_env()
                )
                self._children.add(child)
                self.builds += 1
            try:
                status = child.wait(self.timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return Figures(
                    kind,
                    error=f"deriving {kind} took longer than optimize_timeout_s = {self.timeout_s:g} s",
                ), False
            finally:
                with self._lock:
                    self._children.discard(child)
                if child.stdin is not None:
                    child.stdin.close()
            log.seek(0)
            output = log.read().decode(errors="replace")
        (staging / LOG_FILE).write_text(output)
        written = staging / DERIVATION_FILE
        if status == 0 and written.is_file():
            return Figures.from_json(json.loads(written.read_text())), True
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
        how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
        figures = Figures(kind, error=f"deriving {kind}: its process {how}: {last[:300]}")
        # A process that was killed (by us at shutdown, or by the kernel for memory) may do
        # better next time; any other failure would only repeat.
        return figures, status not in (-9, -15)


def _sample_digest(sample_dir: Path) -> str:
    """The content of the files a check may take its sample from."""
    candidates = (
        sample_dir / REFERENCE_NPZ,
        sample_dir.parent / REFERENCE_NPZ,
        sample_dir / WARMUP_NPZ,
        sample_dir / WARMUP_JSON,
    )
    return "|".join(
        f"{path.parent.name}/{path.name}:{content_sha256(path)}"
        for path in candidates
        if path.is_file()
    )


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _exit_with_parent() -> None:
    """The child's guard: its stdin is a pipe from the server; end of file means the server
    is gone (or cancelled it), and the derivation is no longer wanted."""
    # The file descriptor, not sys.stdin: a buffered reader blocked in a daemon thread aborts
    # the interpreter's shutdown.
    while os.read(0, 4096):
        pass
    os._exit(3)


def child_main(argv: list[str]) -> int:
    request = Request(**json.loads(argv[0]))
    threading.Thread(target=_exit_with_parent, name="parent-watch", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    figures = derive_and_check(request, BackendRegistry())
    (Path(request.out) / DERIVATION_FILE).write_text(json.dumps(figures.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
