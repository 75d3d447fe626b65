"""A bounded directory of downloaded model versions, least recently used evicted first.

Each version lives in its own directory, filled under a temporary name and renamed into place
only when every file is complete, so a directory that exists is always whole. Independent of
the memory LRU: a model evicted from memory reloads from here without a download.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger("multiserve.disk_cache")

_TEMPORARY = ".partial-"


class DiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.evictions = 0
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(_TEMPORARY + "*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a download cut short by a crash

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    def lookup(self, path: Path) -> bool:
        """Whether ``path`` is cached; marks it most recently used if so."""
        try:
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def staging(self) -> Path:
        """A fresh temporary directory to download into (same filesystem, so renamable)."""
        return Path(tempfile.mkdtemp(prefix=_TEMPORARY, dir=self.root))

    def commit(self, staging: Path, path: Path) -> None:
        """Move a complete download into place, then evict down to the bound (never ``path``)."""
        with self._lock:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                shutil.rmtree(staging, ignore_errors=True)  # another download won the race
            else:
                os.replace(staging, path)
            os.utime(path)
            self._evict(keep=path)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def entries(self) -> list[tuple[Path, int, float]]:
        """(directory, bytes, last used) of every cached version."""
        found = []
        for directory in self.root.glob("*/*/*"):
            top = directory.relative_to(self.root).parts[0]
            if directory.is_dir() and not top.startswith("."):
                size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
                found.append((directory, size, directory.stat().st_mtime))
        return found

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def _evict(self, keep: Path) -> None:
        if not self.max_bytes:
            return
        entries = sorted(self.entries(), key=lambda entry: entry[2])
        total = sum(size for _, size, _ in entries)
        for directory, size, _ in entries:
            if total <= self.max_bytes:
                break
            if directory == keep:
                continue
            logger.info("disk cache: evicting %s (%d bytes)", directory, size)
            shutil.rmtree(directory, ignore_errors=True)
            self.evictions += 1
            total -= size
