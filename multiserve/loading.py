"""The mechanics of a version's life: fetch its files, load it with its backend, verify and
warm it up, measure what it costs, and close it. Everything here blocks; the lifecycle calls
it from worker threads and decides when (see `multiserve.policy` for the decisions)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from multiserve import codecs, load_cache, payloads
from multiserve.backends import BackendRegistry, load_model
from multiserve.batching import Dispatcher, Predict, check_batchable
from multiserve.catalog import VersionRecord
from multiserve.errors import (
    DownloadFailed,
    ModelLoadFailed,
    MultiserveError,
    PredictionFailed,
    VersionGone,
)
from multiserve.memory import MemoryCost, MemoryMeter, release_freed_memory
from multiserve.optimize import Optimizer
from multiserve.repository import describe
from multiserve.types import (
    Array,
    Backend,
    LoadContext,
    LoadedModel,
    Model,
    ModelMetadata,
    PayloadModel,
    TensorSpec,
)

logger = logging.getLogger("multiserve.lifecycle")

WARMUP_NPZ = "warmup.npz"
WARMUP_JSON = "warmup.json"


class VersionSource(Protocol):
    """Where a version's files come from: a local directory, or a bucket via a disk cache."""

    def materialize(self, record: VersionRecord) -> Path:
        """The version's files on local disk (blocking: downloads if it has to). Raises
        `VersionGone` when the repository no longer holds them."""
        ...

    def progress(self, record: VersionRecord) -> tuple[int, int] | None:
        """(bytes done, bytes in all) while the version downloads, else None."""
        ...

    def holds(self, name: str, selector: str) -> bool:
        """Whether the repository holds this model (version) even if no scan has seen it yet:
        cheap (blocking) and conservative; False when it cannot tell cheaply."""
        ...


class LocalFiles:
    def materialize(self, record: VersionRecord) -> Path:
        return record.path

    def progress(self, record: VersionRecord) -> tuple[int, int] | None:
        return None

    def holds(self, name: str, selector: str) -> bool:
        return False


class InferenceObserver(Protocol):
    def inferred(self, model: str, version: int, seconds: float) -> None: ...


def predictor(record: VersionRecord, model: LoadedModel, observer: InferenceObserver) -> Predict:
    """The model's predict as its dispatcher calls it (blocking, in a worker thread). An
    exception inside the model becomes PredictionFailed (500); the model stays loaded and keeps
    serving."""
    name, version = record.name, record.version

    def predict(inputs: Mapping[str, Array]) -> dict[str, Array]:
        started = time.perf_counter()
        try:
            outputs = model.predict(inputs)
        except Exception as exc:
            logger.exception("%s version %d raised during predict", name, version)
            raise PredictionFailed(
                f"{name} version {version}: the model raised {type(exc).__name__}: {exc}"
            ) from None
        observer.inferred(name, version, time.perf_counter() - started)
        return {key: np.asarray(value) for key, value in outputs.items()}

    return predict


class Loader:
    """Loads, warms up, measures and closes models. Every method blocks."""

    def __init__(
        self,
        registry: BackendRegistry,
        source: VersionSource,
        meter: MemoryMeter,
        *,
        default_device: str,
        warmup: bool,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.registry = registry
        # optimize / export in a model's config.toml: derived artifacts, checked and cached.
        self.optimizer = optimizer if optimizer is not None else Optimizer(registry)
        self.source = source
        self.meter = meter
        self.default_device = default_device
        self.warmup = warmup

    def load(
        self,
        record: VersionRecord,
        ahead: bool,
        batch_size: int,
        context: LoadContext | None = None,
    ) -> tuple[Model, MemoryCost]:
        """The loaded, verified and warmed-up model, and what it costs. Raises ModelLoadFailed
        (DownloadFailed for a transient fetch failure, VersionGone when its files are gone)."""
        what = f"{record.name} version {record.version}"
        if record.backend is None:
            raise ModelLoadFailed(f"{what}: no backend can load it")
        try:
            backend = self.registry.get(record.backend)
        except ModelLoadFailed as exc:
            raise type(exc)(f"{what}: {exc.message}") from exc
        options = {"device": self.default_device, **record.options}
        try:
            path = self.source.materialize(record)
        except VersionGone:
            raise
        except Exception as exc:
            logger.debug("fetching %s failed", what, exc_info=True)
            raise DownloadFailed(f"{what}: downloading its files failed: {describe(exc)}") from exc
        context = context if context is not None else LoadContext()
        # Outside the memory gate: a derivation runs in a child process, and other loads need
        # not wait for it.
        backend, path, options = self.optimizer.prepare(record, backend, path, options)
        # Also outside the gate: hashing the files of a version not loaded before.
        cached = load_cache.open_entry(self.optimizer.store, record, backend, path, options)
        if cached is not None:
            context = dataclasses.replace(
                context, load_cache=cached.directory, load_cache_hit=cached.hit
            )
        loaded = False
        try:
            model, cost = self.meter.measure(
                lambda: self._load_and_warm(
                    record, path, backend, options, ahead, batch_size, context
                ),
                lambda model: int(model.memory_bytes),
            )
            loaded = True
        except ModelLoadFailed:
            artifact = path / record.artifact if record.artifact else path
            if not artifact.exists():
                raise VersionGone(f"{what}: its files are gone from the repository") from None
            raise
        finally:
            load_cache.close_entry(self.optimizer.store, cached, loaded)
        if isinstance(model, PayloadModel) and self._warms(record):
            # Outside the memory gate: a pipeline's warm-up may load the models it calls.
            payloads.warm_up(path, what, model)
        return model, cost

    def _warms(self, record: VersionRecord) -> bool:
        return record.warmup if record.warmup is not None else self.warmup

    def _load_and_warm(
        self,
        record: VersionRecord,
        path: Path,
        backend: Backend,
        options: dict[str, Any],
        ahead: bool,
        batch_size: int,
        context: LoadContext,
    ) -> Model:
        what = f"{record.name} version {record.version}"
        try:
            if record.artifact is not None:
                _verify_checksum(path / record.artifact)
            model = load_model(backend, path, options, context)
        except MultiserveError as exc:
            raise ModelLoadFailed(f"{what}: {exc.message}") from exc
        except Exception as exc:
            logger.debug("load of %s failed", what, exc_info=True)
            raise ModelLoadFailed(f"{what} failed to load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, PayloadModel | LoadedModel) or not isinstance(
            model.metadata, ModelMetadata
        ):
            raise ModelLoadFailed(f"{what}: backend {record.backend!r} returned no LoadedModel")
        try:
            if not isinstance(model, PayloadModel):
                check_batchable(model.metadata, batch_size)
        except ValueError as exc:
            model.close()
            raise ModelLoadFailed(f"{what}: {exc}") from None
        try:
            if isinstance(model, LoadedModel) and self._warms(record):
                _warm_up(record, path, model, synthesize=ahead)
        except ModelLoadFailed:
            model.close()
            raise
        return model

    def close(self, record: VersionRecord, model: Model, dispatcher: Dispatcher) -> None:
        """Close a model whose dispatcher holds no job, and return its memory to the system."""
        with self.meter.work():
            dispatcher.close()  # its queue is empty: nothing holds the model any more
            try:
                model.close()
            except Exception:
                logger.exception("closing %s version %d failed", record.name, record.version)
            release_freed_memory()
        logger.info("closed %s version %d", record.name, record.version)


def _verify_checksum(artifact: Path) -> None:
    sidecar = artifact.with_name(artifact.name + ".sha256")
    if not sidecar.is_file():
        return
    words = sidecar.read_text().split()
    expected = words[0].lower() if words else ""
    digest = hashlib.sha256()
    with artifact.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelLoadFailed(
            f"{artifact.name} does not match {sidecar.name}: sha256 is {digest.hexdigest()}, "
            f"expected {expected or '(empty file)'}"
        )


def _warm_up(record: VersionRecord, path: Path, model: LoadedModel, synthesize: bool) -> None:
    """One inference before the version serves: on ``warmup.npz`` / ``warmup.json`` if the
    version has one (a failure then fails the load), else, when ``synthesize``, on inputs made
    from the metadata (a failure is only logged: zeros are not every model's idea of a valid
    input)."""
    what = f"{record.name} version {record.version}"
    metadata = model.metadata
    sample: Mapping[str, Array] | None = None
    try:
        if (path / WARMUP_NPZ).is_file():
            with np.load(path / WARMUP_NPZ, allow_pickle=False) as arrays:
                sample = codecs.check_inputs(dict(arrays), metadata)
        elif (path / WARMUP_JSON).is_file():
            sample = codecs.decode_json((path / WARMUP_JSON).read_bytes(), metadata)
    except (MultiserveError, OSError, ValueError) as exc:
        message = exc.message if isinstance(exc, MultiserveError) else str(exc)
        raise ModelLoadFailed(f"{what}: its warm-up sample is unusable: {message}") from exc
    if sample is not None:
        try:
            model.predict(sample)
        except Exception as exc:
            raise ModelLoadFailed(
                f"{what} failed its warm-up: {type(exc).__name__}: {exc}"
            ) from exc
        return
    if not synthesize:
        return  # a request is waiting for this load: it is the first inference itself
    try:
        model.predict({spec.name: _synthetic(spec) for spec in metadata.inputs})
    except Exception as exc:
        logger.warning(
            "%s: warm-up on synthetic inputs raised %s: %s", what, type(exc).__name__, exc
        )


def _synthetic(spec: TensorSpec) -> Array:
    shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
    if spec.dtype == "string":
        return np.full(shape, "", dtype=np.str_)
    return np.zeros(shape, dtype=spec.numpy_dtype)
