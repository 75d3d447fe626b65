"""Misses under a tight cache: a version loaded for waiting requests serves them first."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from multiserve.backends import BackendRegistry
from multiserve.lifecycle import Lifecycle
from multiserve.repository.local import LocalRepository
from tests.npz_backend import ENTRY_POINT, NpzBackend, write_npz_model


def _repo(root: Path, names: str, load_delay_s: float) -> Path:
    for name in names:
        write_npz_model(root / name / "1", np.eye(4, dtype=np.float32))
        (root / name / "1" / "config.toml").write_text(f"load_delay_s = {load_delay_s}\n")
    return root


def test_a_version_loaded_for_waiting_requests_serves_them_before_it_can_be_evicted(
    tmp_path: Path,
) -> None:
    # Two misses through a cache of one, loading side by side and finishing in the same step
    # of the event loop: the second load's admission must not evict the first version before
    # the request that caused its load has started on it (it would then get a closed model and
    # load it again).
    registry = BackendRegistry([ENTRY_POINT])
    repository = LocalRepository(_repo(tmp_path, "ab", 0.2), registry)

    async def scenario() -> list[bool]:
        lifecycle = Lifecycle(registry, max_models=1, load_threads=2, warmup=False)
        lifecycle.reconcile(repository.scan(), time.time() + 60)

        async def closed_when_handed_over(name: str) -> bool:
            entry = await lifecycle.acquire(name, "latest")
            return entry.closed

        tasks = [asyncio.create_task(closed_when_handed_over(name)) for name in "ab"]
        await asyncio.sleep(0.05)  # both loads are running in their worker threads
        time.sleep(0.5)  # noqa: ASYNC251 - hold the loop while both finish: one step for both
        closed = await asyncio.gather(*tasks)
        assert len(lifecycle.cache) == 1
        assert not lifecycle.cache.protected
        await lifecycle.close_all()
        return closed

    before = NpzBackend.loads
    assert asyncio.run(scenario()) == [False, False]
    assert NpzBackend.loads - before == 2  # neither was loaded twice


def test_an_admission_waits_for_protected_room_instead_of_failing(tmp_path: Path) -> None:
    registry = BackendRegistry([ENTRY_POINT])
    repository = LocalRepository(_repo(tmp_path, "abc", 0.0), registry)

    async def scenario() -> None:
        lifecycle = Lifecycle(registry, max_models=1, load_threads=1, warmup=False)
        lifecycle.reconcile(repository.scan(), time.time() + 60)
        entries = await asyncio.gather(*(lifecycle.acquire(name, "latest") for name in "abc"))
        assert [entry.record.name for entry in entries] == ["a", "b", "c"]
        # One fits; which one is the last admitted depends on which worker thread reached the
        # FIFO gate first, which the event loop does not order.
        [held] = list(lifecycle.cache)
        assert held in {("a", 1), ("b", 1), ("c", 1)}
        assert not lifecycle.cache.protected
        await lifecycle.close_all()

    asyncio.run(scenario())
