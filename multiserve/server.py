"""One model server: a repository, the catalog made from it, the lifecycle of its models, and
the operator's decisions about them. Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from pathlib import Path

from multiserve.backends import BackendRegistry
from multiserve.catalog import LATEST, VersionRecord
from multiserve.concurrency import run_sync, set_worker_threads
from multiserve.derived import DEFAULT_ROOT, DerivedStore
from multiserve.errors import (
    Conflict,
    InvalidInput,
    MultiserveError,
    SettingsError,
    StateNotSaved,
    VersionNotFound,
)
from multiserve.lifecycle import Lifecycle, LoadedEntry
from multiserve.metrics import Metrics
from multiserve.optimize import Optimizer
from multiserve.repository.bucket import BucketOptions, BucketRepository, is_bucket_url
from multiserve.repository.disk_cache import DiskCache
from multiserve.repository.layout import is_valid_name, parse_version
from multiserve.repository.local import LocalRepository
from multiserve.settings import Settings
from multiserve.state import OperatorState, StateStore

logger = logging.getLogger("multiserve.server")

_RESERVED_LABELS = {LATEST, "predict", "labels"}
_DIGITS = re.compile(r"[0-9]+")


class ModelServer:
    def __init__(self, settings: Settings, registry: BackendRegistry | None = None) -> None:
        if not settings.models:
            raise SettingsError("no model repository: pass --models DIR or set MULTISERVE_MODELS")
        self.settings = settings
        self.registry = registry if registry is not None else BackendRegistry()
        self.repository: LocalRepository | BucketRepository
        if is_bucket_url(settings.models):
            cache_root = Path(settings.disk_cache_dir or "~/.cache/multiserve").expanduser()
            home = cache_root / _slug(settings.models)
            options = BucketOptions(
                settings.bucket_endpoint, settings.bucket_region, settings.bucket_allow_http
            )
            try:
                self.repository = BucketRepository(
                    settings.models,
                    self.registry,
                    DiskCache(home / "versions", settings.disk_cache_bytes),
                    options,
                    settings.poll_interval_s,
                )
            except Exception as exc:  # obstore rejects malformed URLs and options
                raise SettingsError(f"models: cannot open {settings.models!r}: {exc}") from None
            default_state = home / "state"
        else:
            root = Path(settings.models).expanduser()
            if not root.is_dir():
                raise SettingsError(f"models: {str(root)!r} is not a directory")
            self.repository = LocalRepository(root, self.registry)
            default_state = root / ".multiserve"
        self.metrics = Metrics()
        self.lifecycle = Lifecycle(
            self.registry,
            default_device=settings.device,
            max_models=settings.max_models,
            max_memory=settings.max_memory,
            settle_window_s=settings.settle_window_s,
            version_policy=settings.version_policy,
            warmup=settings.warmup,
            observer=self.metrics,
            source=self.repository,
            load_threads=settings.load_threads,
            inference_threads=settings.inference_threads,
            max_batch_size=settings.max_batch_size,
            optimizer=Optimizer(
                self.registry,
                DerivedStore(
                    Path(settings.optimize_cache_dir or DEFAULT_ROOT), settings.optimize_cache_bytes
                ),
                settings.optimize_timeout_s,
            ),
        )
        self.metrics.watch(self)
        state_dir = Path(settings.state_dir).expanduser() if settings.state_dir else default_state
        self.store = StateStore(state_dir)
        self.operator_state = OperatorState()
        self.admin_token = settings.admin_token or secrets.token_urlsafe(24)
        self._generated_token = not settings.admin_token
        self._scanned = asyncio.Event()
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._state_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.not_ready_reason: str | None = "the model repository is being scanned"
        # Set while the repository cannot be read after it was once: models keep serving.
        self.degraded_reason: str | None = None

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    async def start(self) -> None:
        set_worker_threads(self.settings.worker_threads)
        if self._generated_token:
            logger.warning(
                "admin token (generated; set MULTISERVE_ADMIN_TOKEN to choose one): %s",
                self.admin_token,
            )
        self.operator_state = await run_sync(self.store.load)
        for key in self.operator_state.pins:
            self.lifecycle.cache.pin(key)
        self.lifecycle.labels = {n: dict(t) for n, t in self.operator_state.labels.items()}
        # Scanning runs in the background so that probes answer while a large repository is read.
        self._tasks.append(asyncio.create_task(self._discover()))
        if self.settings.watch and self.repository.poll_interval_s is None:
            self._tasks.append(asyncio.create_task(self._watch()))

    async def _discover(self) -> None:
        """Scan, publish, and scan again on every change (or when a settling version is due;
        or, for a bucket, every poll interval). A failed scan keeps what was published and
        retries with backoff."""
        failures = 0
        poll = self.repository.poll_interval_s
        while not self._stop.is_set():
            self._changed.clear()
            started = time.perf_counter()
            try:
                records = await run_sync(self.repository.scan)
            except Exception as exc:
                failures += 1
                self._scan_failed(exc, failures)
                backoff = min(0.5 * 2 ** (failures - 1), poll or 30.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), backoff)
                continue
            if failures:
                logger.warning("repository %s is reachable again", self.repository.root)
                failures = 0
                self.degraded_reason = None
            due = self.lifecycle.reconcile(records, time.time())
            self.metrics.scans.inc()
            self.metrics.scan_duration.observe(time.perf_counter() - started)
            if not self._scanned.is_set():
                await self._import_backends()
                self.not_ready_reason = None
                self._scanned.set()
                logger.info(
                    "repository %s: %d models, %d versions",
                    self.repository.root,
                    len(self.lifecycle.catalog.models),
                    len(records),
                )
                self._tasks.append(asyncio.create_task(self._load_pinned()))
            if poll is not None:
                due = poll
            elif not self.settings.watch and due is None:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), due)

    async def _import_backends(self) -> None:
        """Import the runtimes that the repository's models need before the server says it is
        ready, so that no model's first request pays for it (onnxruntime takes about 40 ms to
        import here, torch about a second). A backend that is missing or fails to import is
        left to fail the loads that need it, each with its message."""
        names = sorted(
            {r.backend for r in self.lifecycle.catalog.records() if r.backend is not None}
        )
        if names:
            self.not_ready_reason = f"importing the backends the models need: {', '.join(names)}"
        for name in names:
            try:
                await run_sync(self.registry.get, name)
            except MultiserveError:
                continue

    def _scan_failed(self, exc: Exception, failures: int) -> None:
        reason = f"the model repository cannot be read: {type(exc).__name__}: {exc}"
        reason = reason.splitlines()[0][:500]
        self.metrics.scan_failures.inc()
        if failures == 1:
            logger.error("%s (loaded models keep serving; retrying with backoff)", reason)
        if self._scanned.is_set() and self.not_ready_reason is None:
            self.degraded_reason = reason
        else:
            self.not_ready_reason = reason
            self._scanned.set()

    async def _watch(self) -> None:
        assert isinstance(self.repository, LocalRepository)
        while not self._stop.is_set():
            try:
                async for _ in self.repository.changes(self._stop):
                    self.metrics.events.inc()
                    self._changed.set()
            except Exception:
                logger.exception("watching %s failed; retrying in 1 s", self.repository.root)
                await asyncio.sleep(1.0)

    async def _load_pinned(self) -> None:
        for name, version in sorted(self.operator_state.pins):
            try:
                await self.lifecycle.acquire(name, str(version), ahead=True)
            except MultiserveError as exc:
                logger.error("pinned %s version %d did not load: %s", name, version, exc.message)

    @property
    def scanned(self) -> bool:
        """The repository has been scanned once (or failed to be): requests can be resolved."""
        return self._scanned.is_set()

    async def wait_scanned(self) -> None:
        await self._scanned.wait()

    async def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lifecycle.close_all()

    # --- operator actions -----------------------------------------------------------------

    async def load(self, name: str, selector: str) -> LoadedEntry:
        await self.wait_scanned()
        return await self.lifecycle.acquire(name, selector, ahead=True)

    async def evict(self, name: str, selector: str) -> VersionRecord:
        await self.wait_scanned()
        record = self.lifecycle.resolve(name, selector)[0]
        if self.lifecycle.cache.is_pinned(record.key):
            raise Conflict(f"{name} version {record.version} is pinned: unpin it first")
        await self.lifecycle.evict(record.key)
        return record

    async def pin(self, name: str, selector: str) -> LoadedEntry:
        """Pin a version: load it if needed and exempt it from eviction, across restarts."""
        await self.wait_scanned()
        async with self._state_lock:
            record = self.lifecycle.resolve(name, selector)[0]
            cache = self.lifecycle.cache
            # Pinned before it loads, so that nothing evicts it between the load and the pin.
            was_pinned = cache.is_pinned(record.key)
            cache.pin(record.key)
            try:
                entry = await self.lifecycle.acquire(name, str(record.version), ahead=True)
                await self._save(self.operator_state.with_pin(record.key, True))
            except BaseException:
                if not was_pinned:
                    cache.unpin(record.key)
                raise
            return entry

    async def unpin(self, name: str, selector: str) -> VersionRecord:
        await self.wait_scanned()
        async with self._state_lock:
            record = self.lifecycle.resolve(name, selector)[0]
            await self._save(self.operator_state.with_pin(record.key, False))
            self.lifecycle.cache.unpin(record.key)
            return record

    async def set_label(self, name: str, label: str, version: str) -> None:
        await self.wait_scanned()
        _check_label(label)
        number = parse_version(version)
        model = self.lifecycle.catalog.model(name)
        if number is None or number not in model.versions:
            raise VersionNotFound(
                f"model {name!r} has no version {version!r}; versions: "
                + ", ".join(str(v) for v in model.versions)
            )
        async with self._state_lock:
            await self._save(self.operator_state.with_label(name, label, number))
            self.lifecycle.labels.setdefault(name, {})[label] = number

    async def delete_label(self, name: str, label: str) -> None:
        await self.wait_scanned()
        async with self._state_lock:
            if label not in self.lifecycle.labels.get(name, {}):
                raise VersionNotFound(f"model {name!r} has no label {label!r}")
            await self._save(self.operator_state.with_label(name, label, None))
            del self.lifecycle.labels[name][label]

    async def _save(self, state: OperatorState) -> None:
        try:
            await run_sync(self.store.save, state)
        except OSError as exc:
            raise StateNotSaved(
                f"could not save the operator state to {self.store.path}: {exc}; nothing changed"
            ) from exc
        self.operator_state = state


def _slug(url: str) -> str:
    """A directory name for a bucket URL: readable, and unique by its hash."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", url).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _check_label(label: str) -> None:
    if not is_valid_name(label) or label in _RESERVED_LABELS or _DIGITS.fullmatch(label):
        raise InvalidInput(
            f"invalid label {label!r}: labels match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}, are "
            "not all digits, and are not 'latest' or 'predict'"
        )
