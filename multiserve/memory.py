"""Process memory: what a load really cost, and handing freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
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
