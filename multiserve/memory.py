"""Process memory: what a load really cost, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable
from typing import cast

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


def release_freed_memory() -> None:
    """Ask glibc to return free heap pages to the OS. Without the trim, memory freed by a
    closed model stays in the process's heap and RSS never shrinks.

    No ``gc.collect()`` here: a model's weights are freed by its ``close()``, which drops the
    runtime's session or module, not by the garbage collector; and a full collection holds
    the GIL for tens of milliseconds with a runtime imported, which stalled every request in
    flight at each hot swap (``benchmarks/README.md``). The trim runs without the GIL."""
    if _malloc_trim is not None:
        _malloc_trim(0)
