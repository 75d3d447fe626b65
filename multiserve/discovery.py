"""Keeping the catalog true to the repository, whatever the repository does.

Scans run on file-system events (a local root, watched; the watch is re-established when the
root is replaced, recreated or remounted), on a bucket's poll, on a timer as a safety net
(``rescan_interval_s``), and on demand (a request for a model the repository holds but no scan
has seen, a load whose files are gone). A root that cannot be listed is an outage, not an empty
repository, and a listing that suddenly holds no models is held for ``empty_grace_s`` before
anything is retired: in both cases loaded models keep serving and the state is degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Protocol

from multiserve.catalog import VersionRecord
from multiserve.concurrency import run_sync
from multiserve.repository import RepositoryUnavailable, describe
from multiserve.repository.local import LocalRepository

if TYPE_CHECKING:
    from multiserve.metrics import Metrics

logger = logging.getLogger("multiserve.server")

# A local root that cannot be read is retried this often at most: a stat per try is cheap,
# and a remount or a recreated directory should serve again within seconds.
_LOCAL_RETRY_CAP_S = 2.0


class Repository(Protocol):
    @property
    def root(self) -> object: ...

    @property
    def poll_interval_s(self) -> float | None: ...

    def scan(self) -> list[VersionRecord]: ...


class Discovery:
    def __init__(
        self,
        repository: Repository,
        publish: Callable[[list[VersionRecord], float], float | None],
        first_scan: Callable[[], Awaitable[None]],
        metrics: Metrics,
        *,
        watch: bool,
        rescan_interval_s: float,
        empty_grace_s: float,
        settle_window_s: float,
        has_models: Callable[[], bool],
    ) -> None:
        self.repository = repository
        self.publish = publish
        self.first_scan = first_scan
        self.metrics = metrics
        self.watch = watch
        self.rescan_interval_s = rescan_interval_s
        self.empty_grace_s = empty_grace_s
        self.settle_window_s = settle_window_s
        self.has_models = has_models
        # Why the repository cannot be trusted right now (loaded models keep serving).
        self.outage: str | None = None
        self.empty_since: float | None = None
        self.empty_reason: str | None = None
        # While start-up waits for a bucket's versions to settle, poll at the settle window.
        self.starting = True
        self.scanned = asyncio.Event()
        self.scans_done = 0
        self._changed = asyncio.Event()
        self._stop = asyncio.Event()
        self._watch_stop = threading.Event()
        self._watched: Hashable | None = None
        self._rewatch = asyncio.Event()
        self._watch_lost = False
        self.first_failure: str | None = None
        self._published = False

    @property
    def degraded_reason(self) -> str | None:
        return self.outage or self.empty_reason

    @property
    def watching(self) -> bool:
        return self.watch and self.repository.poll_interval_s is None

    def request_scan(self) -> None:
        """Scan as soon as the current scan (if any) is done."""
        self._changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        self._rewatch.set()
        self._watch_stop.set()

    # --- scanning -------------------------------------------------------------------------

    async def run(self) -> None:
        """Scan, publish, and scan again when told to, when a settling version is due, when a
        bucket's poll or the rescan interval comes round. A failed scan keeps what was published
        and retries with backoff."""
        failures = 0
        poll = self.repository.poll_interval_s
        while not self._stop.is_set():
            self._changed.clear()
            started = time.perf_counter()
            try:
                records = await run_sync(self.repository.scan)
            except Exception as exc:
                failures += 1
                self._watch_lost = True  # whatever it watched is gone or unreadable
                self._scan_failed(exc, failures)
                cap = poll if poll is not None else _LOCAL_RETRY_CAP_S
                await self._wait(min(0.25 * 2 ** (failures - 1), max(cap, 0.1)))
                continue
            if failures:
                logger.warning("repository %s is readable again", self.repository.root)
                failures = 0
            self.outage = None
            now = time.time()
            due = self._publish(records, now)
            self.scans_done += 1
            self.metrics.scans.inc()
            self.metrics.scan_duration.observe(time.perf_counter() - started)
            if not self._published:
                # The first scan that worked (an earlier one may have failed: then requests
                # were already answered, with what there was).
                self._published = True
                await self.first_scan()
                self.scanned.set()
            self._check_watch()
            waits = [due]
            if poll is not None:
                # A bucket's versions complete at a later listing: while start-up waits for
                # them, list again after the settle window rather than a whole poll interval.
                fast = self.starting and due is not None
                waits.append(min(poll, max(self.settle_window_s, 0.1)) if fast else poll)
            elif self.rescan_interval_s > 0:
                waits.append(self.rescan_interval_s)
            if self.empty_since is not None:
                waits.append(max(self.empty_since + self.empty_grace_s - now, 0.0))
            pending = [w for w in waits if w is not None and w != float("inf")]
            # Without a watch or a poll there is nothing to wait for but requests to rescan.
            await self._wait(min(pending) if pending else None)

    async def _wait(self, seconds: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    def _publish(self, records: list[VersionRecord], now: float) -> float | None:
        """Publish the scan, unless it is a sudden empty listing still within its grace."""
        if records or not self.has_models():
            if self.empty_since is not None and records:
                logger.warning("repository %s lists models again", self.repository.root)
            self.empty_since = None
            self.empty_reason = None
            return self.publish(records, now)
        if self.empty_since is None:
            self.empty_since = now
            logger.warning(
                "repository %s lists no models, where it had some: keeping them for %.0f s "
                "in case this is an outage (empty_grace_s)",
                self.repository.root,
                self.empty_grace_s,
            )
        if now - self.empty_since < self.empty_grace_s:
            self.empty_reason = (
                f"the model repository lists no models, where it had some; they keep serving "
                f"and retire after {self.empty_grace_s:g} s (empty_grace_s) unless it recovers"
            )
            return None
        logger.warning(
            "repository %s has listed no models for %.0f s: retiring them",
            self.repository.root,
            now - self.empty_since,
        )
        self.empty_reason = None
        return self.publish(records, now)

    def _scan_failed(self, exc: Exception, failures: int) -> None:
        if isinstance(exc, RepositoryUnavailable):
            reason = f"the model repository cannot be read: {exc}"
        else:
            reason = f"the model repository cannot be read: {describe(exc)}"
        self.metrics.scan_failures.inc()
        if failures == 1:
            logger.error("%s (loaded models keep serving; retrying with backoff)", reason)
            logger.debug("scan of %s failed", self.repository.root, exc_info=exc)
        if self.scanned.is_set():
            self.outage = reason
        else:
            self.first_failure = reason
            self.scanned.set()  # requests are answered (with what there is) rather than wait

    # --- watching -------------------------------------------------------------------------

    def _check_watch(self) -> None:
        repository = self.repository
        if not self.watching or not isinstance(repository, LocalRepository):
            return
        # An inode number can be reused by a root deleted and recreated: an outage seen in
        # between also means the old watch is dead.
        if self._watch_lost or repository.identity() != self._watched:
            self._watch_lost = False
            self._rewatch.set()
            self._watch_stop.set()

    async def watch_forever(self) -> None:
        """Watch the root; watch it again whenever it is replaced (deleted and recreated,
        renamed into place, remounted), since a watch follows the directory it started on."""
        repository = self.repository
        assert isinstance(repository, LocalRepository)
        while not self._stop.is_set():
            identity = await run_sync(repository.identity)
            if identity is None:
                # Missing: the scans retry, and set _rewatch once it is back.
                self._rewatch.clear()
                await self._rewatch.wait()
                continue
            self._rewatch.clear()
            self._watch_stop = threading.Event()
            if self._stop.is_set():
                break
            renewed = self._watched is not None
            self._watched = identity
            if renewed:
                logger.info("watching %s again", repository.root)
                self.request_scan()  # what changed while nothing watched
            try:
                async for _ in repository.changes(self._watch_stop):
                    self.metrics.events.inc()
                    self._changed.set()
            except Exception:
                logger.exception("watching %s failed; retrying in 1 s", repository.root)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
