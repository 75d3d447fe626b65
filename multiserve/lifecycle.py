"""Loading models: one load per version at a time, shared by every request that waits for it.

All state here is changed on the event loop only, so each change is atomic with respect to
requests; the blocking part of a load runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum

from multiserve.backends import BackendRegistry
from multiserve.cache import LoadedEntry, ModelCache
from multiserve.catalog import LATEST, Catalog, Key, VersionRecord
from multiserve.concurrency import run_sync
from multiserve.errors import ModelLoadFailed, MultiserveError
from multiserve.types import LoadedModel, ModelMetadata

logger = logging.getLogger("multiserve.lifecycle")


class VersionState(StrEnum):
    AVAILABLE = "available"  # discovered, not loaded; loads on its first request
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"  # the error is kept and shown; other versions keep serving


@dataclass(frozen=True, slots=True)
class Lease:
    """A loaded model held for the duration of one request."""

    record: VersionRecord
    model: LoadedModel


class Lifecycle:
    def __init__(self, registry: BackendRegistry, default_device: str = "cpu") -> None:
        self.registry = registry
        self.default_device = default_device
        self.catalog = Catalog()
        self.cache = ModelCache()
        self._loads: dict[Key, asyncio.Future[LoadedEntry]] = {}
        self._failures: dict[Key, str] = {}
        self.loads = 0
        self.load_failures = 0

    def publish(self, catalog: Catalog) -> None:
        """Make ``catalog`` the snapshot every new request resolves against."""
        self.catalog = catalog

    def state(self, record: VersionRecord) -> tuple[VersionState, str | None]:
        """The version's state and, when it failed, why."""
        if record.problem is not None:
            return VersionState.FAILED, record.problem
        if record.key in self.cache:
            return VersionState.READY, None
        if record.key in self._loads:
            return VersionState.LOADING, None
        failure = self._failures.get(record.key)
        if failure is not None:
            return VersionState.FAILED, failure
        return VersionState.AVAILABLE, None

    def latest(self, name: str) -> VersionRecord | None:
        """The highest version not known to have failed."""
        for record in self.catalog.model(name).descending():
            if self.state(record)[0] is not VersionState.FAILED:
                return record
        return None

    @asynccontextmanager
    async def lease(self, name: str, selector: str) -> AsyncIterator[Lease]:
        """Hold the model that ``name``/``selector`` resolves to, loading it if needed."""
        entry = await self.acquire(name, selector)
        entry.in_flight += 1
        try:
            yield Lease(entry.record, entry.model)
        finally:
            entry.in_flight -= 1

    async def acquire(self, name: str, selector: str) -> LoadedEntry:
        candidates = self.catalog.candidates(name, selector)
        if selector != LATEST:
            return await self._entry(candidates[0])
        # `latest` is the highest version that loads: fall back past failures.
        first_error: ModelLoadFailed | None = None
        for record in candidates:
            try:
                return await self._entry(record)
            except ModelLoadFailed as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise ModelLoadFailed(
            f"model {name!r} has no version that loads; newest error: {first_error.message}"
        )

    async def _entry(self, record: VersionRecord) -> LoadedEntry:
        entry = self.cache.use(record.key)
        if entry is not None:
            return entry
        state, error = self.state(record)
        if state is VersionState.FAILED:
            raise ModelLoadFailed(error or "load failed")
        future = self._loads.get(record.key)
        if future is None:
            future = asyncio.ensure_future(self._load(record))
            # A load whose waiters all went away must not log "exception never retrieved".
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._loads[record.key] = future
        # Shielded: a client that disconnects must not cancel a load others are waiting for.
        return await asyncio.shield(future)

    async def _load(self, record: VersionRecord) -> LoadedEntry:
        started = time.perf_counter()
        try:
            model = await run_sync(self._load_blocking, record)
        except ModelLoadFailed as exc:
            self._failures[record.key] = exc.message
            self.load_failures += 1
            logger.error("%s", exc.message)
            raise
        finally:
            del self._loads[record.key]
        seconds = time.perf_counter() - started
        entry = LoadedEntry(record, model, int(model.memory_bytes), seconds)
        self.cache.add(entry)
        self.loads += 1
        logger.info(
            "loaded %s version %d (%s, %d bytes) in %.3f s",
            record.name,
            record.version,
            record.backend,
            entry.memory_bytes,
            seconds,
        )
        return entry

    def _load_blocking(self, record: VersionRecord) -> LoadedModel:
        what = f"{record.name} version {record.version}"
        if record.backend is None:
            raise ModelLoadFailed(f"{what}: no backend can load it")
        try:
            backend = self.registry.get(record.backend)
        except ModelLoadFailed as exc:
            raise type(exc)(f"{what}: {exc.message}") from exc
        options = {"device": self.default_device, **record.options}
        try:
            model = backend.load(record.path, options)
        except MultiserveError as exc:
            raise ModelLoadFailed(f"{what}: {exc.message}") from exc
        except Exception as exc:
            logger.debug("load of %s failed", what, exc_info=True)
            raise ModelLoadFailed(f"{what} failed to load: {type(exc).__name__}: {exc}") from exc
        if not isinstance(model, LoadedModel) or not isinstance(model.metadata, ModelMetadata):
            raise ModelLoadFailed(f"{what}: backend {record.backend!r} returned no LoadedModel")
        return model

    async def close_all(self) -> None:
        for entry in self.cache:
            self.cache.remove(entry.record.key)
            await run_sync(entry.model.close)
