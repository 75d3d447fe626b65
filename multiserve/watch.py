"""What is watched while a version serves: its input drift (`multiserve.monitor`) and samples
of its payloads (`multiserve.samples`). A `VersionWatch` is the ``observe`` callback of the
version's dispatcher: called in its worker thread(s) with the requests just answered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from multiserve.concurrency import run_sync
from multiserve.monitor import DriftMonitor, DriftSettings, Observed
from multiserve.samples import PayloadLog
from multiserve.types import ModelMetadata

logger = logging.getLogger("multiserve.monitor")


class VersionWatch:
    def __init__(
        self,
        name: str,
        version: int,
        drift: DriftMonitor | None,
        payload_log: PayloadLog | None,
    ) -> None:
        self.name = name
        self.version = version
        self.drift = drift
        self.payload_log = payload_log

    def __call__(self, observed: Observed) -> None:
        """Never raises: a monitoring fault must not touch serving."""
        try:
            if self.payload_log is not None:
                self.payload_log.offer(self.name, self.version, observed)
            if self.drift is not None:
                self.drift.observe(observed)
        except Exception:
            logger.exception("%s version %d: monitoring failed", self.name, self.version)


class Monitoring:
    """The server's monitoring settings and its payload log, shared by every version."""

    def __init__(self, drift: DriftSettings, payload_log: PayloadLog | None = None) -> None:
        self.drift = drift
        self.payload_log = payload_log

    def watch(
        self,
        name: str,
        version: int,
        metadata: ModelMetadata,
        reference_dirs: Callable[[], Sequence[Path]],
    ) -> VersionWatch | None:
        """The watch for a version just loaded, or None when nothing is watched."""
        drift = None
        if self.drift.enabled and metadata.inputs:
            drift = DriftMonitor(name, version, metadata, self.drift, reference_dirs)
        if drift is None and self.payload_log is None:
            return None
        return VersionWatch(name, version, drift, self.payload_log)

    async def refresh_forever(
        self, watches: Callable[[], Iterable[VersionWatch | None]], interval_s: float = 1.0
    ) -> None:
        """Bring the drift statistics of versions whose traffic stopped up to date (in a worker
        thread): the workers compute them only as requests come (`DriftMonitor.observe`), and
        the metrics and the dashboard read the last ones computed."""
        while True:
            await asyncio.sleep(interval_s)
            for watch in list(watches()):
                if watch is not None and watch.drift is not None and watch.drift.stale:
                    try:
                        await run_sync(watch.drift.report)
                    except Exception:
                        logger.exception(
                            "%s version %d: drift statistics failed", watch.name, watch.version
                        )

    def close(self) -> None:
        if self.payload_log is not None:
            self.payload_log.close()
