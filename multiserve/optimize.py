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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multiserve.backends import BackendRegistry
from multiserve.catalog import Ident, VersionRecord
from multiserve.check import (
    DEFAULT_TOLERANCE,
    REFERENCE_NPZ,
    TOLERANCE_KEYS,
    WARMUP_JSON,
    WARMUP_NPZ,
    Figures,
    Mismatch,
    Tolerance,
    check_sample,
    compare,
    incompatibility,
    judge,
    parse_bound,
    rows_of,
    sample_files,
    time_pair,
)
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
from multiserve.types import Backend, Deriver, LoadedModel, Model

logger = logging.getLogger("multiserve.optimize")

OPTIMIZE_KINDS = ("graph", "int8")
EXPORT_KINDS = ("onnx",)
# config.toml keys this module reads; the backends never see them.
KEYS = ("optimize", "export", *TOLERANCE_KEYS)

CONFIG_FILE = "config.toml"
DERIVATION_FILE = "derivation.json"
LOG_FILE = "derive.log"
# Files of a version directory that are not the model itself.
NOT_MODEL = frozenset(
    {CONFIG_FILE, DERIVATION_FILE, LOG_FILE, REFERENCE_NPZ, WARMUP_NPZ, WARMUP_JSON, "READY"}
)
DEFAULT_TIMEOUT_S = 600.0


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
            overrides[key] = parse_bound(key, options[key])
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


# --- what GET /models/{name}/{version} shows ----------------------------------------------------


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
            "max_rel_error": _significant(f.max_rel_error),
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
        return Figures(
            kind, error=cannot_derive(request.backend, backend, kind), source_bytes=source_bytes
        )
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
    figures = Figures(
        kind,
        source_bytes=source_bytes,
        build_seconds=build_seconds,
        backend=target_name,
        artifact=artifact or None,
        load_options=load_options,
    )
    try:
        if artifact:
            write_checksum(out / artifact)
        (out / CONFIG_FILE).write_text(derived_config(kind, load_options))
        _copy_samples(Path(request.sample_dir), out)
        figures = dataclasses.replace(figures, optimized_bytes=model_bytes(out))
        target = registry.get(target_name)
        measured = _check(
            backend, source, request.options, target, out, load_options, Path(request.sample_dir)
        )
    except Exception as exc:
        logger.debug("checking %s failed", kind, exc_info=True)
        message = exc.message if isinstance(exc, MultiserveError) else _first_line(exc)
        if not isinstance(exc, Mismatch | MultiserveError):
            message = f"{type(exc).__name__}: {message}"
        return dataclasses.replace(figures, error=f"the check of {kind} failed: {message}")
    return dataclasses.replace(figures, **measured)


def _tensor_model(model: Model) -> LoadedModel:
    """Only tensor models can be compared output by output."""
    if not isinstance(model, LoadedModel):
        model.close()
        raise Mismatch("only tensor models (predict on named arrays) can be optimised")
    return model


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
    original = _tensor_model(backend.load(source, options))
    source_load = time.perf_counter() - started
    try:
        started = time.perf_counter()
        derived = _tensor_model(target.load(out, load_options))
        derived_load = time.perf_counter() - started
        try:
            problem = incompatibility(original.metadata, derived.metadata)
            if problem is not None:
                raise Mismatch(problem)
            sample, inputs = check_sample(sample_dir, original.metadata)
            expected = original.predict(inputs)
            actual = derived.predict(inputs)
            differences = compare(original.metadata, expected, actual)
            speedup, source_seconds, derived_seconds = time_pair(
                original.predict, derived.predict, inputs
            )
        finally:
            derived.close()
    finally:
        original.close()
    return {
        "max_abs_error": differences.max_abs_error,
        "max_rel_error": differences.max_rel_error,
        "argmax_agreement": differences.argmax_agreement,
        "speedup": speedup,
        "source_seconds": source_seconds,
        "derived_seconds": derived_seconds,
        "source_load_seconds": source_load,
        "derived_load_seconds": derived_load,
        "sample": sample,
        "rows": rows_of(inputs),
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
        parse_bound(key, value)
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
        original = Loadable(record.backend or "", backend, path, rest)
        try:
            served = self._derive(record, plan, original)
        except Exception as exc:  # an unwritable cache directory, a child that cannot start
            logger.exception("%s: deriving %s failed", what, " and ".join(plan.steps))
            figures = Figures(plan.steps[0], error=f"deriving failed: {type(exc).__name__}: {exc}")
            outcome = Outcome(figures, False, figures.error or "", False)
            self._remember(record.ident, {block_name(plan.steps[0]): outcome})
            served = original
        return served.backend, served.path, served.options

    def _derive(self, record: VersionRecord, plan: Plan, original: Loadable) -> Loadable:
        what = f"{record.name} version {record.version}"
        # An export may be only the way to an optimisation (torch -> ONNX -> int8): the next
        # step derives from it when it is accurate, even if it alone is not fast enough to serve.
        source = served = original
        speedup = 1.0  # of `source` over the version as published
        outcomes: dict[str, Outcome] = {}
        for index, kind in enumerate(plan.steps):
            following = plan.steps[index + 1] if index + 1 < len(plan.steps) else None
            outcome, derived = self._step(
                record, kind, source, original.path, plan.tolerance(kind), speedup, following
            )
            outcomes[block_name(kind)] = outcome
            level = logging.INFO if outcome.accepted else logging.WARNING
            verdict = "serves" if outcome.accepted else "does not serve"
            logger.log(level, "%s: %s %s: %s", what, kind, verdict, outcome.reason)
            if derived is not None:
                source, speedup = derived, outcome.figures.speedup or 0.0
                if outcome.accepted:
                    served = derived
        self._remember(record.ident, outcomes)
        return served

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
        prior_speedup: float,
        following: str | None,
    ) -> tuple[Outcome, Loadable | None]:
        """Derive ``kind`` from ``source`` (or reuse it) and judge it: its outcome, and the
        derived version when its answers are within tolerance (it serves only if the outcome
        is accepted). Its speedup is over the version as published: ``prior_speedup`` is
        that of ``source``."""
        if not isinstance(source.backend, Deriver) or kind not in source.backend.derivations:
            figures = Figures(kind, error=cannot_derive(source.name, source.backend, kind))
            return Outcome(figures, False, figures.error or "", False), None
        key = derivation_key(
            f"{kind}:{source.name}",
            directory_digest(source.path),
            {"options": source.options, "sample": _sample_digest(sample_dir)},
        )
        entry = self.store.path(record.name, record.version, kind, key)
        cached = self._reuse(entry)
        reused = cached is not None
        figures = cached if cached is not None else self._build(kind, source, sample_dir, entry)
        if figures.speedup is not None:
            figures = dataclasses.replace(figures, speedup=figures.speedup * prior_speedup)
        accepted, reason = judge(figures, tolerance)
        accurate = accepted or judge(figures, dataclasses.replace(tolerance, min_speedup=0.0))[0]
        if not accurate or figures.backend is None:
            return Outcome(figures, False, reason, reused), None
        try:
            backend = self.registry.get(figures.backend)
        except MultiserveError as exc:
            return Outcome(figures, False, exc.message, reused), None
        if not accepted and following is not None:
            reason += f"; {following} is derived from it"
        derived = Loadable(figures.backend, backend, entry, dict(figures.load_options))
        return Outcome(figures, accepted, reason, reused), derived

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
        request = Request(
            kind, source.name, str(source.path), source.options, str(staging), str(sample_dir)
        )
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
                    command,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_child_env(),
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
                    error=f"deriving {kind} took longer than optimize_timeout_s = "
                    f"{self.timeout_s:g} s",
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
    return "|".join(
        f"{path.parent.name}/{path.name}:{content_sha256(path)}"
        for path in sample_files(sample_dir)
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
