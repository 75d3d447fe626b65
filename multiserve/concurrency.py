"""The one way to keep blocking work (inference, file I/O, model loads) off the event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, TypeVarTuple

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

_executor: ThreadPoolExecutor | None = None


async def run_sync(func: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run ``func(*args)`` in a worker thread and await its result.

    A plain executor hand-off: anyio's ``to_thread`` costs several times more per call (it
    looks up the async library and a capacity limiter each time), which shows on requests
    whose inference takes microseconds.
    """
    return await asyncio.get_running_loop().run_in_executor(_executor, func, *args)


def set_worker_threads(count: int) -> None:
    """Bound the worker threads (the pool is created once; later calls resize it)."""
    global _executor
    previous = _executor
    _executor = ThreadPoolExecutor(max_workers=count, thread_name_prefix="multiserve-worker")
    if previous is not None:
        previous.shutdown(wait=False)
