"""The one way to keep blocking work (inference, file I/O, model loads) off the event loop."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, TypeVarTuple

import anyio.to_thread

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


async def run_sync(func: Callable[[*Ts], T], *args: *Ts) -> T:
    """Run ``func(*args)`` in a worker thread and await its result."""
    return await anyio.to_thread.run_sync(func, *args)


def set_worker_threads(count: int) -> None:
    """Bound the worker threads. Must be called from within the running event loop."""
    anyio.to_thread.current_default_thread_limiter().total_tokens = count
