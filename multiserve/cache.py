"""The cache of loaded models, bounded by count and by bytes, with pinned keys exempt: an LRU,
or W-TinyLFU (`multiserve.tinylfu`: a small LRU window for newcomers, and a frequency sketch
that decides whether a newcomer may take a frequently used model's place).

Pure policy: no I/O, no clocks beyond a counter, no closing of models (the lifecycle does that
with the victims this cache names). All of it runs on the event loop, so each call is atomic.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from multiserve.tinylfu import WindowTinyLfu

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

POLICIES = ("lru", "tinylfu")


class CacheFull(Exception):
    """Admitting the item would break a bound that evicting every unpinned item cannot restore."""


class CacheBusy(CacheFull):
    """Admitting the item needs room that protected items hold: it fits once they are no
    longer protected (soon: see `ModelCache.protect`)."""


@dataclass(slots=True)
class _Slot(Generic[V]):
    value: V
    nbytes: int


class ModelCache(Generic[K, V]):
    """``max_items`` / ``max_bytes`` of 0 mean unbounded. ``policy``: ``"lru"`` evicts the
    least recently used; ``"tinylfu"`` keeps the frequently used against one-off newcomers
    (see `multiserve.tinylfu`). Either way a newcomer is always admitted (a miss is served);
    pinned and protected keys are never evicted."""

    def __init__(self, max_items: int = 0, max_bytes: int = 0, policy: str = "lru") -> None:
        if max_items < 0 or max_bytes < 0:
            raise ValueError("cache bounds must be >= 0 (0 means unbounded)")
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {', '.join(POLICIES)}, not {policy!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.policy = policy
        self._tinylfu: WindowTinyLfu[K] | None = (
            WindowTinyLfu(max_items or 64) if policy == "tinylfu" else None
        )
        self._slots: OrderedDict[K, _Slot[V]] = OrderedDict()
        self._pins: set[K] = set()
        self._protected: set[K] = set()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __iter__(self) -> Iterator[K]:
        """Keys from least to most recently used (a snapshot)."""
        return iter(list(self._slots))

    def items(self) -> Iterator[tuple[K, V]]:
        """From least to most recently used."""
        return iter([(key, slot.value) for key, slot in self._slots.items()])

    def keys(self) -> list[K]:
        return list(self._slots)

    def nbytes(self, key: K) -> int:
        return self._slots[key].nbytes

    @property
    def total_bytes(self) -> int:
        return sum(slot.nbytes for slot in self._slots.values())

    def peek(self, key: K) -> V | None:
        slot = self._slots.get(key)
        return None if slot is None else slot.value

    def get(self, key: K) -> V | None:
        """The value, now the most recently used; None (a miss) if absent. Either way a request
        for ``key``, counted by the frequency sketch (tinylfu)."""
        if self._tinylfu is not None:
            self._tinylfu.record(key)
        slot = self._slots.get(key)
        if slot is None:
            self.misses += 1
            return None
        self.hits += 1
        self._slots.move_to_end(key)
        return slot.value

    def victims(self, key: K, nbytes: int) -> list[K]:
        """The unpinned, unprotected keys to evict so that ``key`` (``nbytes``) fits: the least
        recently used (lru), or the losers of the frequency contests (tinylfu).

        Raises CacheFull, naming why, if it cannot fit even then (CacheBusy when it would fit
        once the protected keys are not); nothing is changed either way.
        """
        if nbytes < 0:
            raise ValueError(f"a model cannot cost {nbytes} bytes")
        if self.max_bytes and nbytes > self.max_bytes:
            raise CacheFull(f"needs {nbytes} bytes, more than the whole budget of {self.max_bytes}")
        chosen = self._choose(key, nbytes, self._pins | self._protected)
        if chosen is not None:
            return chosen
        if self._protected and self._choose(key, nbytes, self._pins) is not None:
            raise CacheBusy(
                f"needs room that {len(self._protected)} just loaded models hold until the "
                "requests waiting for them start"
            )
        held = [k for k in self._pins if k in self._slots]
        pinned = sum(self._slots[k].nbytes for k in held)
        raise CacheFull(
            f"needs {nbytes} bytes; pinned models hold {pinned} bytes of the "
            f"{self.max_bytes or 'unbounded'} byte budget and {len(held)} of "
            f"{self.max_items or 'unbounded'} slots"
        )

    def _choose(self, key: K, nbytes: int, exempt: set[K]) -> list[K] | None:
        """The victims, in eviction order, none of them in ``exempt``; None when evicting
        every other key cannot make room."""
        if self._tinylfu is not None:
            sizes = {cached: slot.nbytes for cached, slot in self._slots.items()}
            return self._tinylfu.choose(
                list(self._slots), sizes, key, nbytes, exempt, self._over, self.max_items
            )
        items = len(self._slots) + (0 if key in self._slots else 1)
        total = self.total_bytes - (self._slots[key].nbytes if key in self._slots else 0) + nbytes
        chosen: list[K] = []
        for candidate, slot in self._slots.items():
            if not self._over(items, total):
                break
            if candidate == key or candidate in exempt:
                continue
            chosen.append(candidate)
            items -= 1
            total -= slot.nbytes
        return None if self._over(items, total) else chosen

    def _over(self, items: int, total: int) -> bool:
        too_many = self.max_items and items > self.max_items
        return bool(too_many or (self.max_bytes and total > self.max_bytes))

    def put(self, key: K, value: V, nbytes: int) -> None:
        """Add (or replace) ``key`` as the most recently used. Evict ``victims()`` first: this
        raises CacheFull rather than break a bound."""
        if self.victims(key, nbytes):
            raise CacheFull("evict the victims before putting")
        self._slots[key] = _Slot(value, nbytes)
        self._slots.move_to_end(key)
        if self._tinylfu is not None:
            self._tinylfu.admitted(list(self._slots), key, self.max_items)

    def remove(self, key: K) -> V | None:
        self._protected.discard(key)
        if self._tinylfu is not None:
            self._tinylfu.removed(key)
        slot = self._slots.pop(key, None)
        return None if slot is None else slot.value

    def protect(self, key: K) -> None:
        """Exempt ``key`` from eviction for a moment: a version just loaded for requests that
        have not started on it yet (their lifecycle lifts it as soon as they have). Unlike a
        pin, a protection makes an admission that needs its room wait (CacheBusy), never fail.
        """
        self._protected.add(key)

    def unprotect(self, key: K) -> None:
        self._protected.discard(key)

    @property
    def protected(self) -> frozenset[K]:
        return frozenset(self._protected)

    def segment(self, key: K) -> str | None:
        """Where ``key`` is: ``"window"`` or ``"main"`` (tinylfu), ``"lru"``, or None."""
        if key not in self._slots:
            return None
        if self._tinylfu is None:
            return "lru"
        return "main" if key in self._tinylfu.main else "window"

    def frequency(self, key: K) -> int | None:
        """The frequency sketch's estimate of ``key``'s recent requests (tinylfu), else None."""
        return None if self._tinylfu is None else self._tinylfu.sketch.estimate(key)

    def pin(self, key: K) -> None:
        """Exempt ``key`` from eviction, whether it is loaded now or later."""
        self._pins.add(key)

    def unpin(self, key: K) -> None:
        self._pins.discard(key)

    def is_pinned(self, key: K) -> bool:
        return key in self._pins

    @property
    def pins(self) -> frozenset[K]:
        return frozenset(self._pins)
