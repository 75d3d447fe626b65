"""A version's life: settling, single-flight loads with warm-up, atomic swaps, LRU eviction
with drain-then-close.

Every state change here happens on the event loop in code that does not await in between, so
each one is atomic with respect to requests; loads and closes run in worker threads. A model's
loads are serialised by a per-model lock: one transition per model at a time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from multiserve import codecs
from multiserve.backends import BackendRegistry
from multiserve.batching import Dispatcher, Predict, Prepare, check_batchable
from multiserve.cache import CacheFull, ModelCache
from multiserve.catalog import LATEST, Catalog, Ident, Key, VersionRecord
from multiserve.concurrency import run_sync
from multiserve.errors import (
    CacheThrashing,
    DownloadFailed,
    ModelLoadFailed,
    ModelTooLarge,
    MultiserveError,
    PredictionFailed,
    VersionNotFound,
    VersionSettling,
)
from multiserve.memory import release_freed_memory, rss_bytes
from multiserve.optimize import Optimizer
from multiserve.types import Array, Backend, LoadedModel, ModelMetadata, TensorSpec

logger = logging.getLogger("multiserve.lifecycle")

T = TypeVar("T")
WARMUP_NPZ = "warmup.npz"
_ACQUIRE_ATTEMPTS = 3
WARMUP_JSON = "warmup.json"


class VersionState(StrEnum):
    SETTLING = "settling"  # files still being written; not a model yet
    AVAILABLE = "available"  # complete, not loaded; loads on its first request
    DOWNLOADING = "downloading"  # fetching its files from a bucket into the disk cache
    LOADING = "loading"  # loading and warming up
    READY = "ready"
    FAILED = "failed"  # the error is kept and shown; other versions keep serving


@dataclass(slots=True, eq=False)
class LoadedEntry:
    record: VersionRecord
    model: LoadedModel
    memory_bytes: int
    load_seconds: float
    dispatcher: Dispatcher  # runs its requests; closed with the model
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0  # requests running on it now; it is closed only at zero
    retiring: bool = False  # out of the cache; closes when in_flight reaches zero
    closed: bool = False


class LifecycleObserver(Protocol):
    """Told of every load, failed load, eviction and swap (metrics implement it)."""

    def loaded(self, model: str, seconds: float) -> None: ...

    def load_failed(self, model: str) -> None: ...

    def evicted(self, model: str, reason: str) -> None: ...

    def swapped(self, model: str) -> None: ...

    def inferred(self, model: str, version: int, seconds: float) -> None: ...


class VersionSource(Protocol):
    """Where a version's files come from: a local directory, or a bucket via a disk cache."""

    def materialize(self, record: VersionRecord) -> Path:
        """The version's files on local disk (blocking: downloads if it has to)."""
        ...

    def progress(self, record: VersionRecord) -> tuple[int, int] | None:
        """(bytes done, bytes in all) while the version downloads, else None."""
        ...


class _LocalFiles:
    def materialize(self, record: VersionRecord) -> Path:
        return record.path

    def progress(self, record: VersionRecord) -> tuple[int, int] | None:
        return None


class _Unobserved:
    def loaded(self, model: str, seconds: float) -> None:
        pass

    def load_failed(self, model: str) -> None:
        pass

    def evicted(self, model: str, reason: str) -> None:
        pass

    def swapped(self, model: str) -> None:
        pass

    def inferred(self, model: str, version: int, seconds: float) -> None:
        pass


@dataclass(frozen=True, slots=True)
class Lease:
    """A loaded model held for the duration of one request."""

    record: VersionRecord
    model: LoadedModel


def _predictor(record: VersionRecord, model: LoadedModel, observer: LifecycleObserver) -> Predict:
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


class Lifecycle:
    def __init__(
        self,
        registry: BackendRegistry,
        *,
        default_device: str = "cpu",
        max_models: int = 0,
        max_memory: int = 0,
        settle_window_s: float = 1.0,
        version_policy: str = "latest",
        warmup: bool = True,
        observer: LifecycleObserver | None = None,
        source: VersionSource | None = None,
        load_threads: int = 1,
        inference_threads: int = 1,
        max_batch_size: int = 1,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.registry = registry
        # optimize / export in a model's config.toml: derived artifacts, checked and cached.
        self.optimizer = optimizer if optimizer is not None else Optimizer(registry)
        self.observer: LifecycleObserver = observer if observer is not None else _Unobserved()
        self.source: VersionSource = source if source is not None else _LocalFiles()
        self.default_device = default_device
        self.settle_window_s = settle_window_s
        self.version_policy = version_policy
        self.warmup = warmup
        self.inference_threads = inference_threads
        self.max_batch_size = max_batch_size
        self.catalog = Catalog()
        self.cache: ModelCache[Key, LoadedEntry] = ModelCache(max_models, max_memory)
        self.labels: dict[str, dict[str, int]] = {}
        self._loads: dict[Ident, asyncio.Future[LoadedEntry]] = {}
        # Why a set of files cannot serve: kept until the files change.
        self._failures: dict[Ident, ModelLoadFailed | ModelTooLarge] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._promotions: dict[Ident, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        # Loads and closes that may run at once. One (the default) makes each load's growth
        # of the process's memory measurable, and bounds the memory held by loads in flight.
        self._memory_gate = threading.Semaphore(load_threads)
        self._measure_lock = threading.Lock()
        self._memory_running = 0
        self._memory_events = 0
        self.loads = 0
        self.load_failures = 0
        self.evictions = 0
        self.swaps = 0

    # --- discovery ------------------------------------------------------------------------

    def reconcile(self, records: list[VersionRecord], now: float) -> float | None:
        """Publish what a scan found. Returns the seconds until a settling version should be
        looked at again, or None if none is settling."""
        old = self.catalog
        hot = {key[0] for key in self.cache}
        published: list[VersionRecord] = []
        next_check: float | None = None
        for record in records:
            settled = record.marker or now - record.changed_at >= self.settle_window_s
            if not settled:
                wait = record.changed_at + self.settle_window_s - now
                next_check = wait if next_check is None else min(next_check, wait)
            previous = old.find(record.key)
            newly_settled = settled and (
                previous is None
                or previous.fingerprint != record.fingerprint
                or not previous.settled
            )
            if newly_settled:
                staged = record.name in hot and self._newer_than_served(record)
            else:
                staged = settled and previous is not None and previous.staged
            published.append(dataclasses.replace(record, settled=settled, staged=staged))

        self.catalog = Catalog.from_records(published)
        current = {record.ident for record in published}
        self._failures = {ident: e for ident, e in self._failures.items() if ident in current}
        for key, entry in self.cache.items():
            if self.catalog.find(key) is None:
                logger.info("%s version %d was removed: retiring it", key[0], key[1])
                self._retire(entry, "removed")
        for record in published:
            if record.staged and record.ident not in self._promotions:
                self._promotions[record.ident] = asyncio.create_task(self._promote(record))
        return None if next_check is None else max(next_check, 0.0)

    def _newer_than_served(self, record: VersionRecord) -> bool:
        if record.key in self.cache:
            return True  # the files of a loaded version changed: reload before serving them
        served = self.latest(record.name) if record.name in self.catalog.models else None
        return served is None or record.version > served.version

    async def _promote(self, record: VersionRecord) -> None:
        """Load and warm a newer version of a hot model, then, in one step, let it serve."""
        try:
            await self._load_shared(record, ahead=True)
            loaded = True
        except MultiserveError as exc:
            loaded = False
            logger.warning("%s; %s keeps serving its previous version", exc.message, record.name)
        finally:
            del self._promotions[record.ident]
        current = self.catalog.find(record.key)
        if current is None or current.ident != record.ident or not current.staged:
            return
        self.catalog = self.catalog.with_record(dataclasses.replace(current, staged=False))
        if loaded:
            self.swaps += 1
            self.observer.swapped(record.name)
            logger.info("%s now serves version %d", record.name, record.version)
            self._apply_version_policy(record)

    def _apply_version_policy(self, promoted: VersionRecord) -> None:
        if (promoted.version_policy or self.version_policy) != "latest":
            return
        labelled = set(self.labels.get(promoted.name, {}).values())
        for key, entry in self.cache.items():
            if (
                key[0] == promoted.name
                and key != promoted.key
                and not self.cache.is_pinned(key)
                and key[1] not in labelled
            ):
                self._retire(entry, "version_policy")

    # --- what requests see ----------------------------------------------------------------

    def state(self, record: VersionRecord) -> tuple[VersionState, str | None]:
        """The version's state and, when it failed, why."""
        if record.problem is not None:
            return VersionState.FAILED, record.problem
        failure = self._failures.get(record.ident)
        error = None if failure is None else failure.message
        if record.key in self.cache:
            return VersionState.READY, error
        if record.ident in self._loads:
            if self.source.progress(record) is not None:
                return VersionState.DOWNLOADING, None
            return VersionState.LOADING, None
        if failure is not None:
            return VersionState.FAILED, error
        if not record.settled:
            return VersionState.SETTLING, None
        return VersionState.AVAILABLE, None

    def _servable(self, record: VersionRecord) -> bool:
        if record.key in self.cache:
            return True  # loaded files keep serving while new ones settle or warm up
        return (
            record.settled
            and not record.staged
            and record.problem is None
            and record.ident not in self._failures
        )

    def latest(self, name: str) -> VersionRecord | None:
        """The version ``latest`` means now: the highest that can serve."""
        for record in self.catalog.model(name).descending():
            if self._servable(record):
                return record
        return None

    def resolve(self, name: str, selector: str) -> list[VersionRecord]:
        """The versions a URL's version part may mean, best first."""
        label = self.labels.get(name, {}).get(selector)
        if label is not None:
            record = self.catalog.model(name).versions.get(label)
            if record is None:
                raise VersionNotFound(
                    f"label {selector!r} of {name!r} points to version {label}, which is not "
                    "in the repository"
                )
            return [record]
        candidates = self.catalog.candidates(name, selector)
        if selector != LATEST:
            return candidates
        servable = [record for record in candidates if self._servable(record)]
        if not servable:
            if all(not record.settled for record in candidates):
                raise VersionSettling(f"model {name!r} has no version ready yet: still settling")
            failing = next((r for r in candidates if r.settled), candidates[0])
            _, error = self.state(failing)
            raise ModelLoadFailed(
                f"model {name!r} has no version that loads; newest error: {error}"
            )
        return servable

    @asynccontextmanager
    async def lease(self, name: str, selector: str) -> AsyncIterator[Lease]:
        """Hold the model that ``name``/``selector`` resolves to, loading it if needed. The
        model is not closed before the lease ends, even if it is evicted meanwhile."""
        entry = await self._checkout(name, selector)
        try:
            yield Lease(entry.record, entry.model)
        finally:
            self._release(entry)

    async def infer(
        self, name: str, selector: str, prepare: Callable[[LoadedEntry], Prepare[T]]
    ) -> tuple[VersionRecord, T]:
        """Run one request on the model that ``name``/``selector`` resolves to, loading it if
        needed: ``prepare(entry)`` is the job its dispatcher runs in a worker thread. The model
        stays open until the job is finished with, even if this call is cancelled first."""
        submitted = self.submit(name, selector, prepare)
        if submitted is None:
            entry = await self._checkout(name, selector)
            submitted = self._submit(entry, prepare)
        record, future = submitted
        return record, await future

    def submit(
        self, name: str, selector: str, prepare: Callable[[LoadedEntry], Prepare[T]]
    ) -> tuple[VersionRecord, asyncio.Future[T]] | None:
        """`infer` without a coroutine, for the hot path: the job queued at once when the model
        is loaded and needs no wait, else None (then call `infer`, which loads, waits or
        raises)."""
        entry = self._ready(name, selector)
        if entry is None:
            return None
        entry.in_flight += 1
        return self._submit(entry, prepare)

    def _submit(
        self, entry: LoadedEntry, prepare: Callable[[LoadedEntry], Prepare[T]]
    ) -> tuple[VersionRecord, asyncio.Future[T]]:
        """Queue a job on a checked-out entry; the entry is released once the job is done."""
        try:
            future = entry.dispatcher.submit(prepare(entry), lambda: self._release(entry))
        except BaseException:
            self._release(entry)
            raise
        return entry.record, future

    def _ready(self, name: str, selector: str) -> LoadedEntry | None:
        """What `acquire` would return when that needs no load and no wait, else None (and
        `acquire` then loads, waits or raises): the hot path, without its coroutines."""
        try:
            record = self.resolve(name, selector)[0]
        except MultiserveError:
            return None
        if self.cache.peek(record.key) is None:
            return None  # not loaded: no hit or miss counted here, `acquire` counts it
        entry = self._loaded(record)
        return None if entry is None or entry.closed else entry

    async def _checkout(self, name: str, selector: str) -> LoadedEntry:
        for _ in range(_ACQUIRE_ATTEMPTS):
            entry = await self.acquire(name, selector)
            # A freshly loaded model can be evicted, and start closing, between its load and
            # this request resuming when the cache is tight: then it must be loaded again.
            if not entry.closed:
                break
        else:
            raise CacheThrashing(
                f"{name} version {entry.record.version} was evicted {_ACQUIRE_ATTEMPTS} times "
                "before it could serve: the cache is too small for the models in use "
                "(raise max_models or max_memory)"
            )
        entry.in_flight += 1
        return entry

    async def acquire(self, name: str, selector: str, *, ahead: bool = False) -> LoadedEntry:
        """The loaded model, loading it if needed. ``ahead``: loading ahead of traffic (an
        operator's load or pin), so warm it up even without a warm-up sample; a request's own
        load skips that, since the request is the first inference anyway."""
        candidates = self.resolve(name, selector)
        if selector != LATEST:
            return await self._entry(candidates[0], ahead)
        # `latest` is the highest version that loads: fall back past failures.
        first_error: MultiserveError | None = None
        for record in candidates:
            try:
                return await self._entry(record, ahead)
            except (ModelLoadFailed, ModelTooLarge) as exc:
                first_error = first_error or exc
        assert first_error is not None
        if isinstance(first_error, ModelTooLarge):
            raise first_error
        raise ModelLoadFailed(
            f"model {name!r} has no version that loads; newest error: {first_error.message}"
        )

    def _loaded(self, record: VersionRecord) -> LoadedEntry | None:
        """The cache's entry for ``record`` if it may serve it: loaded from the same files,
        or from earlier files while new ones settle, wait to be staged, or failed to load."""
        entry = self.cache.get(record.key)
        if entry is not None and (
            entry.record.fingerprint == record.fingerprint
            or record.staged
            or not record.settled
            or record.ident in self._failures
        ):
            entry.last_used = time.time()
            return entry
        return None

    async def _entry(self, record: VersionRecord, ahead: bool) -> LoadedEntry:
        entry = self._loaded(record)
        if entry is not None:
            return entry
        if record.problem is not None:
            raise ModelLoadFailed(record.problem)
        failure = self._failures.get(record.ident)
        if failure is not None:
            raise type(failure)(failure.message)
        if not record.settled:
            raise VersionSettling(
                f"{record.name} version {record.version} is still being written (settling)"
            )
        return await self._load_shared(record, ahead)

    async def _load_shared(self, record: VersionRecord, ahead: bool) -> LoadedEntry:
        future = self._loads.get(record.ident)
        if future is None:
            future = asyncio.ensure_future(self._load(record, ahead))
            # A load whose waiters all went away must not log "exception never retrieved".
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._loads[record.ident] = future
        # Shielded: a client that disconnects must not cancel a load others are waiting for.
        return await asyncio.shield(future)

    # --- loading --------------------------------------------------------------------------

    async def _load(self, record: VersionRecord, ahead: bool) -> LoadedEntry:
        what = f"{record.name} version {record.version}"
        lock = self._locks.setdefault(record.name, asyncio.Lock())
        try:
            async with lock:
                # Refuse early what cannot fit by its files' size. Nothing is evicted until the
                # load succeeded and its real cost is known: evicting first would lose models
                # for a version that then fails, or proves larger than the whole budget.
                self._victims(record.key, record.size_bytes, what)
                started = time.perf_counter()
                try:
                    model, nbytes = await run_sync(self._load_blocking, record, ahead)
                except ModelLoadFailed as exc:
                    if not isinstance(exc, DownloadFailed):  # an outage is no verdict on the files
                        self._failures[record.ident] = exc
                    self.load_failures += 1
                    self.observer.load_failed(record.name)
                    logger.error("%s", exc.message)
                    raise
                seconds = time.perf_counter() - started
                entry = LoadedEntry(
                    record,
                    model,
                    nbytes,
                    seconds,
                    Dispatcher(
                        f"{record.name}-{record.version}",
                        _predictor(record, model, self.observer),
                        max_batch_size=self._batch_size(record),
                        threads=record.inference_threads or self.inference_threads,
                    ),
                )
                try:
                    self._admit(entry, what)
                except MultiserveError as exc:
                    entry.retiring = True
                    self._close_when_idle(entry)
                    if isinstance(exc, ModelTooLarge) and nbytes > self.cache.max_bytes > 0:
                        # Larger than the whole budget: retrying could only fail the same way.
                        self._failures[record.ident] = exc
                    raise
        finally:
            del self._loads[record.ident]
        self.loads += 1
        self.observer.loaded(record.name, seconds)
        logger.info("loaded %s (%s, %d bytes) in %.3f s", what, record.backend, nbytes, seconds)
        return entry

    def _batch_size(self, record: VersionRecord) -> int:
        return record.max_batch_size or self.max_batch_size

    def _victims(self, key: Key, nbytes: int, what: str) -> list[Key]:
        try:
            return self.cache.victims(key, nbytes)
        except CacheFull as exc:
            raise ModelTooLarge(f"{what} does not fit the cache: {exc}") from None

    def _make_room(self, key: Key, nbytes: int, what: str) -> None:
        for victim in self._victims(key, nbytes, what):
            entry = self.cache.peek(victim)
            if entry is not None:
                logger.info("evicting %s version %d (least recently used)", *victim)
                self._retire(entry, "lru")

    def _admit(self, entry: LoadedEntry, what: str) -> None:
        record = entry.record
        current = self.catalog.find(record.key)
        if current is None or current.fingerprint != record.fingerprint:
            raise ModelLoadFailed(f"{what} changed or was removed while it loaded; retry")
        self._make_room(record.key, entry.memory_bytes, what)
        replaced = self.cache.peek(record.key)
        self.cache.put(record.key, entry, entry.memory_bytes)
        if replaced is not None:
            self._count_eviction(replaced, "replaced")
            self._retire_entry(replaced)

    def _load_blocking(self, record: VersionRecord, ahead: bool) -> tuple[LoadedModel, int]:
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
        except Exception as exc:
            raise DownloadFailed(
                f"{what}: downloading its files failed: {type(exc).__name__}: {exc}"
            ) from exc
        # Outside the memory gate: a derivation runs in a child process, and other loads
        # need not wait for it.
        backend, path, options = self.optimizer.prepare(record, backend, path, options)
        with self._memory_gate, self._memory_work() as alone:
            before = rss_bytes()
            model = self._load_and_warm(record, path, backend, options, ahead)
            after = rss_bytes()
            # What the process grew by belongs to this load only if nothing else that moves
            # memory (another load, a close) ran beside it.
            measured = alone() and before is not None and after is not None
        grown = after - before if measured and before is not None and after is not None else 0
        # The backend's own figure, or what the process grew by, whichever is larger: some
        # runtimes allocate far more than their weights (arenas, compiled kernels).
        return model, max(int(model.memory_bytes), grown)

    @contextmanager
    def _memory_work(self) -> Iterator[Callable[[], bool]]:
        """Brackets work that moves the process's memory; yields whether it has run alone."""
        with self._measure_lock:
            self._memory_running += 1
            self._memory_events += 1
            alone_at_start = self._memory_running == 1
            events = self._memory_events
        try:
            yield lambda: alone_at_start and self._memory_events == events
        finally:
            with self._measure_lock:
                self._memory_running -= 1

    def _close(self, entry: LoadedEntry) -> None:
        with self._memory_gate, self._memory_work():
            _close(entry)

    def _load_and_warm(
        self,
        record: VersionRecord,
        path: Path,
        backend: Backend,
        options: dict[str, Any],
        ahead: bool,
    ) -> LoadedModel:
        what = f"{record.name} version {record.version}"
        try:
            if record.artifact is not None:
                _verify_checksum(path / record.artifact)
            model = backend.load(path, options)
        except MultiserveError as exc:
            raise ModelLoadFailed(f"{what}: {exc.message}") from exc
        except Exception as exc:
            logger.debug("load of %s failed", what, exc_info=True)
            raise ModelLoadFailed(f"{what} failed to load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, LoadedModel) or not isinstance(model.metadata, ModelMetadata):
            raise ModelLoadFailed(f"{what}: backend {record.backend!r} returned no LoadedModel")
        try:
            check_batchable(model.metadata, self._batch_size(record))
        except ValueError as exc:
            model.close()
            raise ModelLoadFailed(f"{what}: {exc}") from None
        try:
            if record.warmup if record.warmup is not None else self.warmup:
                _warm_up(record, model, synthesize=ahead)
        except ModelLoadFailed:
            model.close()
            raise
        return model

    # --- retiring and closing -------------------------------------------------------------

    def _retire(self, entry: LoadedEntry, reason: str) -> None:
        """Take the entry out of the cache now; close it after its last running request."""
        if self.cache.peek(entry.record.key) is entry:
            self.cache.remove(entry.record.key)
            self._count_eviction(entry, reason)
        self._retire_entry(entry)

    def _count_eviction(self, entry: LoadedEntry, reason: str) -> None:
        if reason != "shutdown":
            self.evictions += 1
            self.observer.evicted(entry.record.name, reason)

    @property
    def closing(self) -> int:
        """Versions out of the cache whose close has not finished: memory not yet released."""
        return len(self._closing)

    def _retire_entry(self, entry: LoadedEntry) -> None:
        if entry.retiring:
            return
        entry.retiring = True
        self._close_when_idle(entry)

    def _release(self, entry: LoadedEntry) -> None:
        entry.in_flight -= 1
        self._close_when_idle(entry)

    def _close_when_idle(self, entry: LoadedEntry) -> None:
        if not entry.retiring or entry.in_flight > 0 or entry.closed:
            return
        entry.closed = True
        task = asyncio.get_running_loop().create_task(run_sync(self._close, entry))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def evict(self, key: Key) -> bool:
        """Evict a loaded version (draining it). False if it was not loaded."""
        entry = self.cache.peek(key)
        if entry is None:
            return False
        self._retire(entry, "admin")
        return True

    async def close_all(self) -> None:
        self.optimizer.close()
        for task in list(self._promotions.values()):
            task.cancel()
        for _, entry in self.cache.items():
            self._retire(entry, "shutdown")
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    def describe(self, record: VersionRecord) -> dict[str, Any]:
        state, error = self.state(record)
        described: dict[str, Any] = {
            "name": record.name,
            "version": str(record.version),
            "state": state.value,
            "backend": record.backend,
            "artifact": record.artifact,
            "pinned": self.cache.is_pinned(record.key),
            "labels": sorted(
                label
                for label, v in self.labels.get(record.name, {}).items()
                if v == record.version
            ),
        }
        if error is not None:
            described["error"] = error
        progress = self.source.progress(record)
        if progress is not None:
            described["download"] = {"bytes_done": progress[0], "bytes_total": progress[1]}
        entry = self.cache.peek(record.key)
        if entry is not None:
            described["memory_bytes"] = entry.memory_bytes
            described["load_seconds"] = round(entry.load_seconds, 6)
            described.update(entry.model.metadata.to_json())
            described.update(self.optimizer.describe(entry.record))
        return described

    def loaded_entries(self) -> list[tuple[Key, LoadedEntry]]:
        return list(self.cache.items())


def _close(entry: LoadedEntry) -> None:
    record = entry.record
    entry.dispatcher.close()  # its queue is empty: nothing holds the model any more
    try:
        entry.model.close()
    except Exception:
        logger.exception("closing %s version %d failed", record.name, record.version)
    release_freed_memory()
    logger.info("closed %s version %d", record.name, record.version)


def _verify_checksum(artifact: Path) -> None:
    sidecar = artifact.with_name(artifact.name + ".sha256")
    if not sidecar.is_file():
        return
    expected = sidecar.read_text().split()[0].lower() if sidecar.read_text().split() else ""
    digest = hashlib.sha256()
    with artifact.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelLoadFailed(
            f"{artifact.name} does not match {sidecar.name}: sha256 is {digest.hexdigest()}, "
            f"expected {expected or '(empty file)'}"
        )


def _warm_up(record: VersionRecord, model: LoadedModel, synthesize: bool) -> None:
    """One inference before the version serves: on ``warmup.npz`` / ``warmup.json`` if the
    version has one (a failure then fails the load), else, when ``synthesize``, on inputs made
    from the metadata (a failure is only logged: zeros are not every model's idea of a valid
    input)."""
    what = f"{record.name} version {record.version}"
    metadata = model.metadata
    sample: Mapping[str, Array] | None = None
    try:
        if (record.path / WARMUP_NPZ).is_file():
            with np.load(record.path / WARMUP_NPZ, allow_pickle=False) as arrays:
                sample = codecs.check_inputs(dict(arrays), metadata)
        elif (record.path / WARMUP_JSON).is_file():
            sample = codecs.decode_json((record.path / WARMUP_JSON).read_bytes(), metadata)
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
