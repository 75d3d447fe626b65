"""What a version directory holds, wherever it lives: its backend, its artifact, the options for
the backend, the core's own options, and what is wrong with it, if anything."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multiserve.backends import BackendRegistry
from multiserve.repository.layout import merge_config

# config.toml keys the core reads; the rest go to the backend.
CORE_KEYS = ("backend", "version_policy", "warmup", "max_batch_size", "inference_threads")
NO_ARTIFACT = "holds no model artifact (model.onnx, model.pt, model.pt2, predictor.py)"


@dataclass(frozen=True, slots=True)
class Classified:
    backend: str | None
    artifact: str | None
    options: dict[str, Any] = field(default_factory=dict)
    version_policy: str | None = None
    warmup: bool | None = None
    max_batch_size: int | None = None
    inference_threads: int | None = None
    problem: str | None = None

    def serving(self) -> dict[str, Any]:
        """The core's own options, as `VersionRecord` fields."""
        return {
            "version_policy": self.version_policy,
            "warmup": self.warmup,
            "max_batch_size": self.max_batch_size,
            "inference_threads": self.inference_threads,
        }

    @property
    def loadable(self) -> bool:
        """Something can try to load it (it may still have a problem to report)."""
        return self.backend is not None or self.problem is not None


def classify(
    registry: BackendRegistry,
    path: Path,
    filenames: Iterable[str],
    model_config: dict[str, Any],
    version_config: dict[str, Any],
    problem: str | None = None,
) -> Classified:
    options = merge_config(model_config, version_config)
    core = {key: options.pop(key) for key in CORE_KEYS if key in options}
    problem = problem or _check_core(core)
    backend = str(core["backend"]) if "backend" in core else None
    artifact: str | None = None
    if backend is None:
        try:
            found = registry.detect(path, filenames)
        except ValueError as exc:
            found, problem = None, problem or str(exc)
        if found is not None:
            backend, artifact = found[0], found[1] or None
    if problem is None and backend is not None:
        problem = registry.refusal(backend, artifact)
    if problem is not None:
        core = {}
    return Classified(
        backend=backend,
        artifact=artifact,
        options=options,
        version_policy=core.get("version_policy"),
        warmup=core.get("warmup"),
        max_batch_size=core.get("max_batch_size"),
        inference_threads=core.get("inference_threads"),
        problem=problem,
    )


def _check_core(core: dict[str, Any]) -> str | None:
    policy = core.get("version_policy")
    if policy is not None and policy not in ("latest", "all"):
        return f"version_policy must be 'latest' or 'all', not {policy!r}"
    warmup = core.get("warmup")
    if warmup is not None and not isinstance(warmup, bool):
        return f"warmup must be true or false, not {warmup!r}"
    for key in ("max_batch_size", "inference_threads"):
        value = core.get(key)
        whole = isinstance(value, int) and not isinstance(value, bool)
        if value is not None and (not whole or value < 1):
            return f"{key} must be a whole number of at least 1, not {value!r}"
    return None
