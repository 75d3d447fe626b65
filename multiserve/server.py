"""One model server: a repository, the catalog made from it, the lifecycle of its models, and
the operator's decisions about them. Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
import time
from pathlib import Path

from multiserve import policy
from multiserve.admission import Admission
from multiserve.backends import BackendRegistry
from multiserve.catalog import VersionRecord
from multiserve.concurrency import run_sync, set_worker_threads
from multiserve.derived import DEFAULT_ROOT, DerivedStore
from multiserve.discovery import Discovery
from multiserve.errors import (
    Conflict,
    InvalidInput,
    MultiserveError,
    SettingsError,
    StateNotSaved,
    VersionNotFound,
)
from multiserve.lifecycle import Lifecycle, LoadedEntry
from multiserve.memory import map_large_blocks
from multiserve.metrics import Metrics
from multiserve.monitor import DriftSettings
from multiserve.optimize import Optimizer
from multiserve.pipelines import load_context
from multiserve.repository.bucket import BucketOptions, BucketRepository, is_bucket_url
from multiserve.repository.disk_cache import DiskCache
from multiserve.repository.layout import parse_version
from multiserve.repository.local import LocalRepository
from multiserve.samples import PayloadLog, SampleSettings
from multiserve.settings import Settings
from multiserve.state import OperatorState, StateStore, is_valid_label
from multiserve.status import History, Observers
from multiserve.watch import Monitoring

logger = logging.getLogger("multiserve.server")


class ModelServer:
    def __init__(self, settings: Settings, registry: BackendRegistry | None = None) -> None:
        if not settings.models:
            raise SettingsError("no model repository: pass --models DIR or set MULTISERVE_MODELS")
        self.settings = settings
        self.registry = registry if registry is not None else BackendRegistry()
        self.registry.allow_repository_code = settings.allow_python_predictors
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
                    settings.settle_window_s,
                )
            except Exception as exc:  # obstore rejects malformed URLs and options
                raise SettingsError(f"models: cannot open {settings.models!r}: {exc}") from None
            default_state = home / "state"
        else:
            root = Path(settings.models).expanduser()
            if not root.is_dir():
                raise SettingsError(f"models: {str(root)!r} is not a directory")
            self.repository = LocalRepository(
                root, self.registry, allow_external_symlinks=settings.allow_external_symlinks
            )
            default_state = root / ".multiserve"
        self.metrics = Metrics()
        # Per-model traffic and lifecycle events over the last minutes, for GET /status.
        self.history = History()
        self.lifecycle = Lifecycle(
            self.registry,
            default_device=settings.device,
            max_models=settings.max_models,
            max_memory=settings.max_memory,
            cache_policy=settings.cache_policy,
            settle_window_s=settings.settle_window_s,
            settle_wait_s=settings.settle_wait_s,
            rescan=self._request_scan,
            version_policy=settings.version_policy,
            warmup=settings.warmup,
            observer=Observers(self.metrics, self.history),
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
        self.monitoring = _monitoring(settings)
        self.lifecycle.monitoring = self.monitoring
        self.metrics.watch(self)
        self.admission = Admission(
            max_queue=settings.max_queue,
            request_timeout_s=settings.request_timeout_s,
            max_receive_bytes=settings.max_receive_bytes,
            registry=self.metrics.registry,
            known=lambda model: model in self.lifecycle.catalog.models,
        )
        self.lifecycle.admission = self.admission
        state_dir = Path(settings.state_dir).expanduser() if settings.state_dir else default_state
        self.store = StateStore(state_dir)
        self.operator_state = OperatorState()
        self.admin_token = settings.admin_token or secrets.token_urlsafe(24)
        self._generated_token = not settings.admin_token
        self.discovery = Discovery(
            self.repository,
            self._publish,
            self._first_scan,
            self.metrics,
            watch=settings.watch,
            rescan_interval_s=settings.rescan_interval_s,
            empty_grace_s=settings.empty_grace_s,
            settle_window_s=settings.settle_window_s,
            has_models=lambda: bool(self.lifecycle.catalog.models),
        )
        self._state_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._not_ready: str | None = "the model repository is being scanned"
        # What start-up waits for: the versions the first scan found, and when it gives up.
        self._first_scan_keys: list[tuple[str, int]] | None = None
        self._startup_deadline = 0.0

    @property
    def ready(self) -> bool:
        """Ready means servable: the first scan's versions are settled, pinned versions are
        loaded (or failed), or the start-up timeout has passed."""
        return self.not_ready_reason is None

    @property
    def not_ready_reason(self) -> str | None:
        if self._first_scan_keys is None and self.discovery.first_failure is not None:
            return self.discovery.first_failure  # the repository could not be read at all
        return self._not_ready

    @not_ready_reason.setter
    def not_ready_reason(self, reason: str | None) -> None:
        """Say not ready (with why) or ready, as a shutdown does; start-up's own checks keep
        setting it while the first scan's versions settle."""
        self._not_ready = reason

    @property
    def degraded_reason(self) -> str | None:
        """Set while the repository cannot be trusted (unreadable, or suddenly empty): the
        loaded models keep serving."""
        return self.discovery.degraded_reason

    @degraded_reason.setter
    def degraded_reason(self, reason: str | None) -> None:
        self.discovery.outage = reason

    def _request_scan(self) -> None:
        self.discovery.request_scan()

    async def start(self) -> None:
        set_worker_threads(self.settings.worker_threads)
        map_large_blocks()  # so that a model's measured cost is the same every time
        self.lifecycle.context = load_context(self.lifecycle, self.settings)
        if self._generated_token:
            logger.warning(
                "admin token (generated; set MULTISERVE_ADMIN_TOKEN to choose one): %s",
                self.admin_token,
            )
        self.operator_state = await run_sync(self.store.load)
        for key in self.operator_state.pins:
            self.lifecycle.cache.pin(key)
        self.lifecycle.labels = {n: dict(t) for n, t in self.operator_state.labels.items()}
        self._tasks.append(asyncio.create_task(self.history.run(self.metrics)))
        self._tasks.append(
            asyncio.create_task(
                self.monitoring.refresh_forever(
                    lambda: [entry.watch for _, entry in self.lifecycle.loaded_entries()]
                )
            )
        )
        # Scanning runs in the background so that probes answer while a large repository is read.
        self._tasks.append(asyncio.create_task(self.discovery.run()))
        if self.discovery.watching:
            self._tasks.append(asyncio.create_task(self.discovery.watch_forever()))

    def _publish(self, records: list[VersionRecord], now: float) -> float | None:
        due = self.lifecycle.reconcile(records, now)
        self._update_readiness()
        return due

    async def _first_scan(self) -> None:
        """After the first scan: import the backends its models need, then wait (not ready)
        for its versions to settle and the pinned ones to load, within startup_timeout_s."""
        await self._import_backends()
        catalog = self.lifecycle.catalog
        logger.info(
            "repository %s: %d models, %d versions",
            self.repository.root,
            len(catalog.models),
            len(catalog.records()),
        )
        self._first_scan_keys = [record.key for record in catalog.records()]
        self._startup_deadline = time.monotonic() + self.settings.startup_timeout_s
        self._tasks.append(asyncio.create_task(self._load_pinned()))
        self._tasks.append(asyncio.create_task(self._startup_timeout()))
        self._update_readiness()

    def _update_readiness(self, timed_out: bool = False) -> None:
        if self.ready or self._first_scan_keys is None:
            return
        lifecycle = self.lifecycle
        pending = policy.startup_pending(
            lifecycle.catalog,
            self._first_scan_keys,
            lifecycle.cache.pins,
            lifecycle.cache,
            lifecycle.failures,
        )
        if not pending:
            self._not_ready = None
            self.discovery.starting = False
            logger.info("ready: every version found at start is settled")
        elif timed_out or time.monotonic() >= self._startup_deadline:
            self._not_ready = None
            self.discovery.starting = False
            logger.warning(
                "ready after startup_timeout_s (%g s) with versions still pending: %s",
                self.settings.startup_timeout_s,
                "; ".join(pending),
            )
        else:
            self._not_ready = "waiting for the repository's versions: " + "; ".join(pending)

    async def _startup_timeout(self) -> None:
        await asyncio.sleep(max(self._startup_deadline - time.monotonic(), 0.0))
        self._update_readiness(timed_out=True)

    async def _import_backends(self) -> None:
        """Import the runtimes that the repository's models need before the server says it is
        ready, so that no model's first request pays for it (onnxruntime takes about 40 ms to
        import here, torch about a second). A backend that is missing or fails to import is
        left to fail the loads that need it, each with its message."""
        names = sorted(
            {r.backend for r in self.lifecycle.catalog.records() if r.backend is not None}
        )
        if names:
            self._not_ready = f"importing the backends the models need: {', '.join(names)}"
        for name in names:
            try:
                await run_sync(self.registry.get, name)
            except MultiserveError:
                continue

    async def _load_pinned(self) -> None:
        for name, version in sorted(self.operator_state.pins):
            try:
                await self.lifecycle.acquire(name, str(version), ahead=True)
            except MultiserveError as exc:
                logger.error("pinned %s version %d did not load: %s", name, version, exc.message)
            self._update_readiness()

    @property
    def scanned(self) -> bool:
        """The repository has been scanned once (or failed to be): requests can be resolved."""
        return self.discovery.scanned.is_set()

    async def wait_scanned(self) -> None:
        await self.discovery.scanned.wait()

    async def stop(self) -> None:
        self.discovery.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lifecycle.close_all()
        await run_sync(self.monitoring.close)

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


def _monitoring(settings: Settings) -> Monitoring:
    drift = DriftSettings(
        window=settings.drift_window,
        reference_rows=settings.drift_reference_rows,
        threshold=settings.drift_threshold,
        sample_rate=settings.drift_sample_rate,
    )
    payload_log = None
    if settings.payload_log_dir:
        payload_log = PayloadLog(
            SampleSettings(
                Path(settings.payload_log_dir).expanduser(),
                rate=settings.payload_log_rate,
                shapes_only=settings.payload_log_shapes_only,
                file_bytes=settings.payload_log_file_bytes,
                max_bytes=settings.payload_log_max_bytes,
            )
        )
    return Monitoring(drift, payload_log)


def _slug(url: str) -> str:
    """A directory name for a bucket URL: readable, and unique by its hash."""
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "-", url).strip("-")[:60]
    return f"{readable}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _check_label(label: str) -> None:
    if not is_valid_label(label):
        raise InvalidInput(
            f"invalid label {label!r}: labels match [A-Za-z0-9][A-Za-z0-9_.-]{{0,127}}, are "
            "not all digits, and are not 'latest' or 'predict'"
        )
