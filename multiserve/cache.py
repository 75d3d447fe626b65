"""The loaded models, in least-recently-used order. No I/O: closing models is the lifecycle's."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from multiserve.catalog import Key, VersionRecord
from multiserve.types import LoadedModel


@dataclass(slots=True, eq=False)
class LoadedEntry:
    record: VersionRecord
    model: LoadedModel
    memory_bytes: int
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    # Requests running on this model right now; it may only be closed at zero.
    in_flight: int = 0


class ModelCache:
    def __init__(self) -> None:
        self._entries: OrderedDict[Key, LoadedEntry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[LoadedEntry]:
        """Entries from least to most recently used."""
        return iter(list(self._entries.values()))

    def peek(self, key: Key) -> LoadedEntry | None:
        """The entry, without counting a use."""
        return self._entries.get(key)

    def use(self, key: Key) -> LoadedEntry | None:
        """The entry, marked most recently used; None (a miss) if it is not loaded."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        entry.last_used = time.time()
        return entry

    def add(self, entry: LoadedEntry) -> None:
        self._entries[entry.record.key] = entry

    def remove(self, key: Key) -> LoadedEntry | None:
        return self._entries.pop(key, None)

    @property
    def memory_bytes(self) -> int:
        return sum(entry.memory_bytes for entry in self._entries.values())
