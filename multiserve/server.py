"""One model server: a repository, the catalog made from it, and the lifecycle of its models.
Knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from multiserve.backends import BackendRegistry
from multiserve.catalog import Catalog
from multiserve.concurrency import run_sync, set_worker_threads
from multiserve.errors import SettingsError
from multiserve.lifecycle import Lifecycle
from multiserve.repository.local import LocalRepository
from multiserve.settings import Settings

logger = logging.getLogger("multiserve.server")


class ModelServer:
    def __init__(self, settings: Settings, registry: BackendRegistry | None = None) -> None:
        if not settings.models:
            raise SettingsError("no model repository: pass --models DIR or set MULTISERVE_MODELS")
        root = Path(settings.models).expanduser()
        if not root.is_dir():
            raise SettingsError(f"models: {str(root)!r} is not a directory")
        self.settings = settings
        self.registry = registry if registry is not None else BackendRegistry()
        self.repository = LocalRepository(root, self.registry)
        self.lifecycle = Lifecycle(self.registry, settings.device)
        self._scanned = asyncio.Event()
        self._scan_task: asyncio.Task[None] | None = None
        self.not_ready_reason: str | None = "the model repository is being scanned"

    @property
    def ready(self) -> bool:
        return self.not_ready_reason is None

    async def start(self) -> None:
        set_worker_threads(self.settings.worker_threads)
        # Scanning runs in the background so that probes answer while a large repository is read.
        self._scan_task = asyncio.create_task(self._scan())

    async def _scan(self) -> None:
        try:
            records = await run_sync(self.repository.scan)
        except (
            Exception
        ) as exc:  # the scan skips bad entries itself; this is a bug or an OS failure
            logger.exception("scanning %s failed", self.repository.root)
            self.not_ready_reason = f"scanning the model repository failed: {exc}"
        else:
            self.lifecycle.publish(Catalog.from_records(records))
            self.not_ready_reason = None
            logger.info(
                "repository %s: %d models, %d versions",
                self.repository.root,
                len(self.lifecycle.catalog.models),
                len(records),
            )
        finally:
            self._scanned.set()

    async def wait_scanned(self) -> None:
        await self._scanned.wait()

    async def stop(self) -> None:
        if self._scan_task is not None and not self._scan_task.done():
            self._scan_task.cancel()
        await self.lifecycle.close_all()
