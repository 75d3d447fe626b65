"""Process memory: what a load really cost, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar, cast

from multiserve.gate import FairGate

T = TypeVar("T")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """Resident set size of this process, or None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


_malloc_trim = _load_malloc_trim()

# mallopt's parameter for the size from which an allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3
# Model weights and a runtime's load buffers are megabytes each: from this size on, each gets
# its own mapping, returned to the system the moment it is freed.
LARGE_BLOCK = 4 * 1024 * 1024


def map_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Make glibc give every allocation of ``threshold`` bytes or more its own mapping, for
    good. By default glibc raises that threshold each time such a block is freed (up to
    32 MiB), after which a model's weights and its runtime's load buffers land in the heaps of
    whichever worker threads loaded them, and the trim at a close returns those heaps' pages
    only in part: the same 25 MB model then measured 25, 51, 3 and 25 MB over four loads.
    With the threshold fixed, freeing a model returns its memory at once and a load's growth
    is its steady size every time. False where this is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def release_freed_memory() -> None:
    """Collect garbage and ask glibc to return free heap pages to the OS. Without the trim,
    memory freed by a closed model stays in the process's heap and RSS never shrinks.

    The collection is cheap only because the long-lived objects (the modules of the server
    and its runtimes) are frozen out of it (`freeze_long_lived`): over torch's and
    onnxruntime's 170,000 objects a full collection holds the GIL for about 100 ms here, which
    stalled every request in flight at each hot swap. The trim runs without the GIL."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def freeze_long_lived() -> None:
    """Move every object alive now out of the garbage collector's reach (`gc.freeze`): the
    backend registry calls it after importing a runtime, which freezes the server's modules
    and the runtime's. They live as long as the
    process, so collecting never frees them, and leaving them out makes a full collection
    cost microseconds instead of a tenth of a second. Reference counting still frees them."""
    gc.freeze()


def load_concurrency(load_threads: int, cores: int | None = None) -> int:
    """The loads that may run at once for the ``load_threads`` setting: itself, or for 0, half
    the cores (1 to 4). A load keeps about one core busy (parsing, optimising a graph, warming
    up) while requests need the others; past 4, loads mostly wait on the same disk."""
    if load_threads > 0:
        return load_threads
    cores = cores if cores is not None else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


@dataclass(frozen=True, slots=True)
class MemoryCost:
    """What a loaded model is charged, and how that figure was obtained.

    ``method``: ``"measured"`` when the figure is the growth of the process's resident memory
    over the load and warm-up, both ends read after the heap trim (so the runtime's transient
    load buffers, already returned, are not counted); ``"reported"`` when it is the backend's
    own figure (its files, or its parameters), used when that is larger or when the growth
    could not be measured (another load or close ran beside it, or no /proc)."""

    nbytes: int
    method: str
    measured_bytes: int | None
    reported_bytes: int

    @property
    def measured(self) -> bool:
        return self.method == "measured"

    def to_json(self) -> dict[str, object]:
        return {
            "bytes": self.nbytes,
            "method": self.method,
            "measured_bytes": self.measured_bytes,
            "reported_bytes": self.reported_bytes,
        }


class MemoryMeter:
    """Brackets the work that moves the process's memory (loads and closes), at most
    ``concurrency`` at a time and in the order they asked (a `FairGate`), and measures what a
    load grew it by when it ran alone. Work that overlapped other work is charged its
    backend's own figure instead (`MemoryCost`), so parallel loads never charge a model for
    another's growth, or credit it with another's close."""

    def __init__(self, concurrency: int = 1) -> None:
        self.gate = FairGate(concurrency)
        self._lock = threading.Lock()
        self._running = 0
        self._events = 0

    @contextmanager
    def work(self) -> Iterator[Callable[[], bool]]:
        """Holds a turn; yields whether the work has run alone so far."""
        with self.gate:
            with self._lock:
                self._running += 1
                self._events += 1
                alone_at_start = self._running == 1
                events = self._events
            try:
                yield lambda: alone_at_start and self._events == events
            finally:
                with self._lock:
                    self._running -= 1

    def measure(self, load: Callable[[], T], reported: Callable[[T], int]) -> tuple[T, MemoryCost]:
        """Run ``load`` in a turn; its result and its cost. Resident memory is read after a
        heap trim on both sides: read straight after a load it would include the buffers the
        runtime used while loading and has freed but glibc has not yet returned, which made the
        same model cost anything from 1.5x to 2.5x its steady size."""
        with self.work() as alone:
            release_freed_memory()
            before = rss_bytes()
            result = load()
            release_freed_memory()
            after = rss_bytes()
            measured = (
                after - before if alone() and before is not None and after is not None else None
            )
        own = max(int(reported(result)), 0)
        if measured is not None and measured >= own:
            return result, MemoryCost(measured, "measured", measured, own)
        return result, MemoryCost(own, "reported", measured, own)
