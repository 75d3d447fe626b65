"""Finding backends. Backends are separate distributions that register a `Backend` class under
the ``multiserve.backends`` entry-point group; they are imported only when a model needs them,
so a missing optional backend never breaks ``import multiserve``."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from multiserve.errors import BackendNotInstalled, ModelLoadFailed
from multiserve.memory import freeze_long_lived
from multiserve.types import Backend, LoadContext, Model

ENTRY_POINT_GROUP = "multiserve.backends"

# Artifact file name -> backend name, for the backends this project ships. Knowing these without
# importing anything lets a scan name the package to install when a backend is missing.
KNOWN_ARTIFACTS: dict[str, str] = {
    "model.onnx": "onnx",
    "model.pt": "torch",
    "model.pt2": "torch",
    "predictor.py": "python",
}
# Known artifacts that are code: loading one executes it.
CODE_ARTIFACTS = frozenset({"predictor.py"})
CODE_REFUSED = (
    "runs Python code from the model repository, which this server does not allow: start it "
    "with --allow-python-predictors (or set allow_python_predictors = true) to serve it"
)
DISTRIBUTIONS: dict[str, str] = {
    "onnx": "multiserve-onnx",
    "torch": "multiserve-torch",
    "python": "multiserve-python",
}

logger = logging.getLogger("multiserve.backends")


class BackendRegistry:
    """Installed backends by name, each imported and instantiated once, on first use."""

    def __init__(
        self,
        available: Iterable[EntryPoint] | None = None,
        *,
        allow_repository_code: bool = False,
    ) -> None:
        if available is None:
            available = entry_points(group=ENTRY_POINT_GROUP)
        self._entry_points = {ep.name: ep for ep in available}
        self._backends: dict[str, Backend] = {}
        self._lock = threading.Lock()
        # Whether versions whose loading executes code from the repository may load (the
        # server sets it from `allow_python_predictors`).
        self.allow_repository_code = allow_repository_code

    def names(self) -> list[str]:
        return sorted(self._entry_points)

    def imported(self) -> list[str]:
        """The backends imported so far."""
        with self._lock:
            return sorted(self._backends)

    def get(self, name: str) -> Backend:
        with self._lock:
            backend = self._backends.get(name)
            if backend is not None:
                return backend
            entry_point = self._entry_points.get(name)
            if entry_point is None:
                distribution = DISTRIBUTIONS.get(name, f"a package providing backend {name!r}")
                raise BackendNotInstalled(
                    f"backend {name!r} is not installed: pip install {distribution}"
                )
            try:
                backend = entry_point.load()()
            except Exception as exc:
                raise ModelLoadFailed(
                    f"backend {name!r} ({entry_point.value}) failed to import: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            if not isinstance(backend, Backend):
                raise ModelLoadFailed(
                    f"{entry_point.value} does not implement the Backend protocol"
                )
            # Optional: a backend may set up, once, what its runtime allocates for the whole
            # process on first use (onnxruntime: about 10 MB), so that no model's measured
            # memory cost includes it and no first request waits for it.
            start = getattr(backend, "start", None)
            if callable(start):
                try:
                    start()
                except Exception:
                    logger.warning("backend %r failed to start its runtime", name, exc_info=True)
            self._backends[name] = backend
            # A runtime's modules live as long as the process: keep them out of every
            # garbage collection from now on (see multiserve.memory).
            freeze_long_lived()
            return backend

    def detect(self, version_dir: Path, filenames: Iterable[str]) -> tuple[str, str] | None:
        """(backend name, artifact) for a version directory, or None if nothing can load it.

        Raises ValueError when the directory holds artifacts for more than one backend.
        """
        found = sorted(name for name in filenames if name in KNOWN_ARTIFACTS)
        code = [name for name in found if name in CODE_ARTIFACTS]
        if code:
            # A predictor beside a model file is the code that serves it (say, a predictor.py
            # that opens model.onnx itself with pre- and post-processing around it).
            found = code
        if len(found) > 1:
            raise ValueError(
                f"more than one model artifact ({', '.join(found)}); keep one per version"
            )
        if found:
            return KNOWN_ARTIFACTS[found[0]], found[0]
        # Third-party backends: only now are they imported, to ask whether they can load it.
        for name in self.names():
            if name in DISTRIBUTIONS:
                continue
            try:
                if self.get(name).can_load(version_dir):
                    return name, ""
            except ModelLoadFailed as exc:
                logger.warning("%s", exc)
        return None

    def refusal(self, backend: str, artifact: str | None) -> str | None:
        """Why a version that ``backend`` loads from ``artifact`` may not load here, or None.
        Decided from names alone for the artifacts the project knows, so a scan never imports
        (let alone runs) a predictor to classify it."""
        if self.allow_repository_code:
            return None
        if artifact in KNOWN_ARTIFACTS:
            runs_code = artifact in CODE_ARTIFACTS
        else:
            try:  # a backend named in config.toml, or found by its own can_load
                runs_code = bool(getattr(self.get(backend), "executes_repository_code", False))
            except ModelLoadFailed:
                return None  # it cannot load anything here; its load says why
        return CODE_REFUSED if runs_code else None


def load_model(
    backend: Backend, version_dir: Path, options: Mapping[str, Any], context: LoadContext
) -> Model:
    """``backend.load``, given the context too when its ``load`` declares a ``context``
    parameter (see `multiserve.types.Backend`)."""
    try:
        wants_context = "context" in inspect.signature(backend.load).parameters
    except (TypeError, ValueError):
        wants_context = False
    if wants_context:
        return backend.load(version_dir, options, context=context)  # type: ignore[call-arg]
    return backend.load(version_dir, options)
