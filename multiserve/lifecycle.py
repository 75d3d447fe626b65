"""A version's life: single-flight loads, atomic swaps, LRU eviction with drain-then-close.

The coordinator between the pure decisions of `multiserve.policy` and the blocking mechanics
of `multiserve.loading`. Every state change here happens on the event loop in code that does
not await in between, so each one is atomic with respect to requests; loads and closes run in
worker threads. A model's loads are serialised by a per-model lock: one transition per model at
a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TypeVar

from multiserve import payloads, policy
from multiserve.admission import Admission
from multiserve.backends import BackendRegistry
from multiserve.batching import Dispatcher, Prepare
from multiserve.cache import CacheBusy, CacheFull, ModelCache
from multiserve.catalog import LATEST, Catalog, Ident, Key, VersionRecord
from multiserve.concurrency import run_sync
from multiserve.errors import (
    CacheThrashing,
    DownloadFailed,
    ModelLoadFailed,
    ModelTooLarge,
    MultiserveError,
    NotFound,
    VersionGone,
    VersionSettling,
)
from multiserve.loading import (
    WARMUP_JSON,
    WARMUP_NPZ,
    Loader,
    LocalFiles,
    VersionSource,
    predictor,
)
from multiserve.memory import MemoryCost, MemoryMeter, load_concurrency
from multiserve.optimize import Optimizer
from multiserve.policy import VersionState
from multiserve.types import Describable, LoadContext, Model, PayloadModel
from multiserve.watch import Monitoring, VersionWatch

__all__ = [
    "WARMUP_JSON",
    "WARMUP_NPZ",
    "Lease",
    "Lifecycle",
    "LifecycleObserver",
    "LoadedEntry",
    "VersionSource",
    "VersionState",
]

logger = logging.getLogger("multiserve.lifecycle")

T = TypeVar("T")
_ACQUIRE_ATTEMPTS = 3


@dataclass(slots=True, eq=False)
class LoadedEntry:
    record: VersionRecord
    model: Model
    memory_bytes: int
    load_seconds: float
    dispatcher: Dispatcher  # runs its requests; closed with the model
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    in_flight: int = 0  # requests running on it now; it is closed only at zero
    retiring: bool = False  # out of the cache; closes when in_flight reaches zero
    closed: bool = False
    memory: MemoryCost | None = None  # how memory_bytes was obtained

    @property
    def watch(self) -> VersionWatch | None:
        """Its drift monitor and payload sampling, if either is on."""
        observe = self.dispatcher.observe
        return observe if isinstance(observe, VersionWatch) else None


class LifecycleObserver(Protocol):
    """Told of every load, failed load, eviction and swap (metrics implement it)."""

    def loaded(self, model: str, seconds: float) -> None: ...

    def load_failed(self, model: str) -> None: ...

    def evicted(self, model: str, reason: str) -> None: ...

    def swapped(self, model: str) -> None: ...

    def inferred(self, model: str, version: int, seconds: float) -> None: ...


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
    model: Model


class Lifecycle:
    def __init__(
        self,
        registry: BackendRegistry,
        *,
        default_device: str = "cpu",
        max_models: int = 0,
        max_memory: int = 0,
        cache_policy: str = "lru",
        settle_window_s: float = 1.0,
        settle_wait_s: float = 0.0,
        rescan: Callable[[], None] | None = None,
        version_policy: str = "latest",
        warmup: bool = True,
        observer: LifecycleObserver | None = None,
        source: VersionSource | None = None,
        load_threads: int = 0,
        inference_threads: int = 1,
        max_batch_size: int = 1,
        optimizer: Optimizer | None = None,
    ) -> None:
        self.registry = registry
        # optimize / export in a model's config.toml: derived artifacts, checked and cached.
        self.optimizer = optimizer if optimizer is not None else Optimizer(registry)
        self.observer: LifecycleObserver = observer if observer is not None else _Unobserved()
        self.source: VersionSource = source if source is not None else LocalFiles()
        self.default_device = default_device
        self.settle_window_s = settle_window_s
        self.settle_wait_s = settle_wait_s
        # Asks discovery for a scan soon (the repository may hold what the catalog does not).
        self._rescan: Callable[[], None] = rescan if rescan is not None else lambda: None
        # Set, and replaced, by every reconcile: what a request waiting for a scan awaits.
        self._scan_seen = asyncio.Event()
        self.version_policy = version_policy
        self.warmup = warmup
        # Loads and closes that may run at once (0: from the core count), first come, first
        # served. One makes each load's growth of the process's memory measurable; with more,
        # a load that overlapped another is charged its backend's own figure.
        self.loader = Loader(
            registry,
            self.source,
            MemoryMeter(load_concurrency(load_threads)),
            default_device=default_device,
            warmup=warmup,
            optimizer=self.optimizer,
        )
        self.inference_threads = inference_threads
        self.max_batch_size = max_batch_size
        self.catalog = Catalog()
        # Given to each load (with the version's name and number): the server sets its
        # `models` handle and settings once it runs.
        self.context = LoadContext()
        self.cache: ModelCache[Key, LoadedEntry] = ModelCache(max_models, max_memory, cache_policy)
        self.labels: dict[str, dict[str, int]] = {}
        self._loads: dict[Ident, asyncio.Future[LoadedEntry]] = {}
        # Requests (and promotions) awaiting each load. A version loaded for waiting requests
        # is protected from eviction until the last of them has started on it, so that a load
        # finishing just after it cannot evict it first (which made them load it again).
        self._waiting: dict[Ident, int] = {}
        # Set, and replaced, whenever a protection lifts: what an admission short of room that
        # protected versions hold awaits.
        self._unprotected = asyncio.Event()
        # Why a set of files cannot serve: kept until the files change.
        self._failures: dict[Ident, ModelLoadFailed | ModelTooLarge] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._promotions: dict[Ident, asyncio.Task[None]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.loads = 0
        self.load_failures = 0
        self.evictions = 0
        self.swaps = 0
        # Drift monitoring and payload samples; the server sets it from its settings.
        self.monitoring: Monitoring | None = None
        # Bounds each version's queue (`multiserve.admission`); the server sets it.
        self.admission: Admission | None = None

    # --- discovery ------------------------------------------------------------------------

    def reconcile(self, records: list[VersionRecord], now: float) -> float | None:
        """Publish what a scan found. Returns the seconds until a settling version should be
        looked at again, or None if none is settling."""
        result = policy.reconcile(
            self.catalog, records, now, self.settle_window_s, self.cache.keys(), self._failures
        )
        self.catalog = result.catalog
        current = {record.ident for record in self.catalog.records()}
        self._failures = {ident: e for ident, e in self._failures.items() if ident in current}
        for key in result.removed:
            entry = self.cache.peek(key)
            if entry is not None:
                logger.info("%s version %d was removed: retiring it", key[0], key[1])
                self._retire(entry, "removed")
        for record in result.staged:
            if record.ident not in self._promotions:
                self._promotions[record.ident] = asyncio.create_task(self._promote(record))
        seen, self._scan_seen = self._scan_seen, asyncio.Event()
        seen.set()
        return result.next_check

    @property
    def failures(self) -> Mapping[Ident, ModelLoadFailed | ModelTooLarge]:
        """Why each set of files that failed cannot serve (kept until the files change)."""
        return MappingProxyType(self._failures)

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
        labelled = set(self.labels.get(promoted.name, {}).values())
        for key in policy.superseded(
            promoted, self.cache.keys(), self.cache.pins, labelled, self.version_policy
        ):
            entry = self.cache.peek(key)
            if entry is not None:
                self._retire(entry, "version_policy")

    # --- what requests see ----------------------------------------------------------------

    def state(self, record: VersionRecord) -> tuple[VersionState, str | None]:
        """The version's state and, when it failed, why."""
        failure = self._failures.get(record.ident)
        loading = record.ident in self._loads
        return policy.state(
            record,
            loaded=record.key in self.cache,
            loading=loading,
            downloading=loading and self.source.progress(record) is not None,
            failure=None if failure is None else failure.message,
        )

    def latest(self, name: str) -> VersionRecord | None:
        """The version ``latest`` means now: the highest that can serve."""
        return policy.latest(self.catalog, name, self.cache, self._failures)

    def resolve(self, name: str, selector: str) -> list[VersionRecord]:
        """The versions a URL's version part may mean, best first."""
        return policy.resolve(self.catalog, self.labels, name, selector, self.cache, self._failures)

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
        self,
        name: str,
        selector: str,
        prepare: Callable[[LoadedEntry], Prepare[T]],
        wait: Callable[[VersionRecord, asyncio.Future[T]], Awaitable[T]] | None = None,
    ) -> tuple[VersionRecord, T]:
        """Run one request on the model that ``name``/``selector`` resolves to, loading it if
        needed: ``prepare(entry)`` is the job its dispatcher runs in a worker thread. The model
        stays open until the job is finished with, even if this call is cancelled first.
        ``wait``: how to await the job's future (`Admission.wait`: a deadline, a client that
        leaves), else plainly."""
        submitted = self.submit(name, selector, prepare)
        if submitted is None:
            entry = await self._checkout(name, selector)
            submitted = self._submit(entry, prepare)
        record, future = submitted
        if wait is not None:
            return record, await wait(record, future)
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
            admission = self.admission
            if admission is None:
                future = entry.dispatcher.submit(prepare(entry), lambda: self._release(entry))
            else:
                admission.admit(entry)  # 503 past the version's max_queue

                def done() -> None:
                    admission.released(entry.record.key, future)
                    self._release(entry)

                future = entry.dispatcher.submit(prepare(entry), done)
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
        load skips that, since the request is the first inference anyway.

        Waits up to ``settle_wait_s`` for what the next scans may settle: a version still being
        written, one the repository holds but no scan has seen yet, one whose files vanished
        before it loaded (the rescan then answers 404, or loads what is there now)."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        probed = False
        while True:
            try:
                return await self._acquire(name, selector, ahead)
            except VersionSettling as exc:
                error: MultiserveError = exc
            except VersionGone as exc:
                error = exc
                self._rescan()
            except NotFound as exc:
                if probed or self.settle_wait_s <= 0:
                    raise
                probed = True
                if not await run_sync(self.source.holds, name, selector):
                    raise
                error = exc
                self._rescan()
            if deadline is None:
                deadline = loop.time() + self.settle_wait_s
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise error
            seen = self._scan_seen
            try:
                await asyncio.wait_for(seen.wait(), remaining)
            except TimeoutError:
                raise error from None

    async def _acquire(self, name: str, selector: str, ahead: bool) -> LoadedEntry:
        candidates = self.resolve(name, selector)
        if selector != LATEST:
            return await self._entry(candidates[0], ahead)
        # `latest` is the highest version that loads: fall back past failures.
        first_error: MultiserveError | None = None
        for record in candidates:
            try:
                return await self._entry(record, ahead)
            except VersionGone:
                raise
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
        if entry is not None and policy.may_serve_loaded(
            entry.record.fingerprint, record, self._failures
        ):
            entry.last_used = time.time()
            return entry
        return None

    async def _entry(self, record: VersionRecord, ahead: bool) -> LoadedEntry:
        entry = self._loaded(record)
        if entry is not None:
            return entry
        error = policy.unavailable(record, self._failures)
        if error is not None:
            raise error
        return await self._load_shared(record, ahead)

    async def _load_shared(self, record: VersionRecord, ahead: bool) -> LoadedEntry:
        future = self._loads.get(record.ident)
        if future is None:
            future = asyncio.ensure_future(self._load(record, ahead))
            # A load whose waiters all went away must not log "exception never retrieved".
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._loads[record.ident] = future
        self._waiting[record.ident] = self._waiting.get(record.ident, 0) + 1
        try:
            # Shielded: a client that disconnects must not cancel a load others are waiting for.
            return await asyncio.shield(future)
        finally:
            # Runs in the same step as the caller taking its lease (no await in between).
            self._stop_waiting(record)

    def _stop_waiting(self, record: VersionRecord) -> None:
        left = self._waiting[record.ident] - 1
        if left:
            self._waiting[record.ident] = left
            return
        del self._waiting[record.ident]
        if record.key in self.cache.protected:
            self.cache.unprotect(record.key)
            lifted, self._unprotected = self._unprotected, asyncio.Event()
            lifted.set()

    # --- loading --------------------------------------------------------------------------

    async def _load(self, record: VersionRecord, ahead: bool) -> LoadedEntry:
        what = f"{record.name} version {record.version}"
        lock = self._locks.setdefault(record.name, asyncio.Lock())
        try:
            async with lock:
                # Refuse early what cannot fit by its files' size. Nothing is evicted until the
                # load succeeded and its real cost is known: evicting first would lose models
                # for a version that then fails, or proves larger than the whole budget.
                with contextlib.suppress(CacheBusy):  # fits once protections lift
                    self._victims(record.key, record.size_bytes, what)
                started = time.perf_counter()
                try:
                    context = dataclasses.replace(
                        self.context, name=record.name, version=record.version
                    )
                    model, cost = await run_sync(
                        self.loader.load, record, ahead, self._batch_size(record), context
                    )
                except ModelLoadFailed as exc:
                    # An outage, or files that are gone, is no verdict on the files.
                    if not isinstance(exc, DownloadFailed | VersionGone):
                        self._failures[record.ident] = exc
                    self.load_failures += 1
                    self.observer.load_failed(record.name)
                    logger.error("%s", exc.message)
                    raise
                seconds = time.perf_counter() - started
                nbytes = cost.nbytes
                entry = LoadedEntry(
                    record,
                    model,
                    nbytes,
                    seconds,
                    self._dispatcher(record, model),
                    memory=cost,
                )
                try:
                    await self._admit(entry, what)
                except MultiserveError as exc:
                    entry.retiring = True
                    self._close_when_idle(entry)
                    if isinstance(exc, ModelTooLarge) and policy.refusal_lasts(
                        nbytes, self.cache.max_bytes, cost.measured
                    ):
                        # Clearly larger than the whole budget: a retry could only fail the
                        # same way. Within the measurement's noise, the next request retries.
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

    def _dispatcher(self, record: VersionRecord, model: Model) -> Dispatcher:
        batch = self._batch_size(record)
        threads = record.inference_threads or self.inference_threads
        if isinstance(model, PayloadModel):
            name, version, observer = record.name, record.version, self.observer
            return payloads.PayloadDispatcher(
                name,
                version,
                model,
                lambda seconds: observer.inferred(name, version, seconds),
                max_batch_size=batch,
                threads=threads,
            )
        return Dispatcher(
            f"{record.name}-{record.version}",
            predictor(record, model, self.observer),
            max_batch_size=batch,
            threads=threads,
            observe=self.watch(record, model),
        )

    def watch(self, record: VersionRecord, model: Model) -> VersionWatch | None:
        """What watches a tensor model's requests (drift, payload samples), if anything."""
        if self.monitoring is None:
            return None
        source = self.source

        def reference_dirs() -> list[Path]:  # in a worker thread: materialize may block
            return [source.materialize(record), record.path.parent]

        return self.monitoring.watch(record.name, record.version, model.metadata, reference_dirs)

    def _victims(self, key: Key, nbytes: int, what: str) -> list[Key]:
        try:
            return self.cache.victims(key, nbytes)
        except CacheBusy:
            raise
        except CacheFull as exc:
            raise ModelTooLarge(f"{what} does not fit the cache: {exc}") from None

    def _make_room(self, key: Key, nbytes: int, what: str) -> None:
        for victim in self._victims(key, nbytes, what):
            entry = self.cache.peek(victim)
            if entry is not None:
                logger.info("evicting %s version %d (%s)", *victim, self.cache.policy)
                self._retire(entry, self.cache.policy)

    async def _admit(self, entry: LoadedEntry, what: str) -> None:
        record = entry.record
        while True:
            current = self.catalog.find(record.key)
            if current is None or current.fingerprint != record.fingerprint:
                raise ModelLoadFailed(f"{what} changed or was removed while it loaded; retry")
            try:
                self._make_room(record.key, entry.memory_bytes, what)
                break
            except CacheBusy:
                # The room is held by versions just loaded for requests about to start on
                # them: within a few steps of the event loop.
                await self._unprotected.wait()
        replaced = self.cache.peek(record.key)
        self.cache.put(record.key, entry, entry.memory_bytes)
        if self._waiting.get(record.ident):
            self.cache.protect(record.key)
        if replaced is not None:
            self._count_eviction(replaced, "replaced")
            self._retire_entry(replaced)

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
        task = asyncio.get_running_loop().create_task(
            run_sync(self.loader.close, entry.record, entry.model, entry.dispatcher)
        )
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
            if entry.memory is not None:
                described["memory"] = entry.memory.to_json()
            described["load_seconds"] = round(entry.load_seconds, 6)
            described.update(entry.model.metadata.to_json())
            described.update(self.optimizer.describe(entry.record))
            if isinstance(entry.model, Describable):
                described.update(entry.model.describe())
        return described

    def loaded_entries(self) -> list[tuple[Key, LoadedEntry]]:
        return list(self.cache.items())
