"""W-TinyLFU: which loaded model to evict when a frequency sketch knows better than recency.

LRU lets a burst of one-off requests (a scan, a batch job touching every model once) flush the
models that serve most traffic. W-TinyLFU (Einziger, Friedman and Manes, "TinyLFU: A Highly
Efficient Cache Admission Policy", 2017; Caffeine's policy) splits the cache in two:

- a small **window** LRU, where every newcomer lands (in a model server a miss must be served:
  the model is loaded whatever happens, serves the requests that caused its load, and only
  then competes for a place);
- the **main** segment, an LRU of the models that earned their place.

When the window overflows, its least recently used model (the *candidate*) competes with the
main segment's least recently used one (the *victim*): a count-min sketch of recent request
frequencies keeps the one asked for more often and evicts the other. A model seen once
therefore passes through the window and is the first evicted, while the hot set stays in main.
The sketch ages (halves every counter after a sample of increments), so a hot set that moves
on is forgotten.

Pure policy, as `multiserve.cache` is: no I/O, no clock, no threads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_MASK = (1 << 64) - 1
_ROWS = 4
# 6-bit counters (TinyLFU's are 4-bit): a model server sees few distinct keys, each often, and
# 15 saturated for every hot model; measured with benchmarks/cache_sim.py.
_MAX_COUNT = 63
# Each row's index is 16 bits of one 64-bit mixed hash: at most 2^16 counters a row.
_MAX_WIDTH = 1 << 16
_KNOWN_KEYS = 4096
# The window's share of the cache (Caffeine starts at 1%); at least one model.
WINDOW_FRACTION = 0.01


def _mix(value: int) -> int:
    """splitmix64's finaliser: spreads nearby hashes (Python's hash of small ints is the int)."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK
    return value ^ (value >> 31)


class FrequencySketch(Generic[K]):
    """A count-min sketch of how often each key was asked for lately: 4 rows of saturating
    4-bit counters; every ``sample_size`` increments all counters are halved (aging)."""

    def __init__(self, width: int, sample_size: int) -> None:
        if width < 1 or width & (width - 1) or width > _MAX_WIDTH:
            raise ValueError(f"the sketch width must be a power of two <= 2^16, not {width}")
        if sample_size < 1:
            raise ValueError(f"the sample size must be >= 1, not {sample_size}")
        self.width = width
        self.sample_size = sample_size
        self._rows = [[0] * width for _ in range(_ROWS)]
        self._additions = 0
        self.resets = 0
        # A model server asks about the same few keys all the time: their indexes, remembered.
        self._known: dict[K, tuple[int, int, int, int]] = {}

    @classmethod
    def for_capacity(cls, capacity: int) -> FrequencySketch[K]:
        """Sized for a cache of ``capacity`` items: wide enough that the few keys a model
        server sees rarely share every row, and a sample of 10 per slot (TinyLFU's W/C), at
        least 500 (a small cache's estimates are otherwise too noisy to rank its models)."""
        capacity = max(capacity, 16)
        width = min(1 << max(8, (16 * capacity - 1).bit_length()), _MAX_WIDTH)
        return cls(width, max(10 * capacity, 500))

    def _indexes(self, key: K) -> tuple[int, int, int, int]:
        known = self._known.get(key)
        if known is not None:
            return known
        mixed, mask = _mix(hash(key) & _MASK), self.width - 1
        indexes = (mixed & mask, (mixed >> 16) & mask, (mixed >> 32) & mask, (mixed >> 48) & mask)
        if len(self._known) >= _KNOWN_KEYS:
            self._known.clear()
        self._known[key] = indexes
        return indexes

    def increment(self, key: K) -> None:
        """Count one request for ``key`` (every request: this is on the hot path)."""
        added = False
        for row, index in zip(self._rows, self._indexes(key), strict=True):
            count = row[index]
            if count < _MAX_COUNT:
                row[index] = count + 1
                added = True
        if added:
            self._additions += 1
            if self._additions >= self.sample_size:
                self._age()

    def estimate(self, key: K) -> int:
        return min(row[index] for row, index in zip(self._rows, self._indexes(key), strict=True))

    def _age(self) -> None:
        for row in self._rows:
            for index, count in enumerate(row):
                row[index] = count >> 1
        self._additions //= 2
        self.resets += 1


class WindowTinyLfu(Generic[K]):
    """The segments of a W-TinyLFU cache and its decisions. The cache that owns it keeps the
    items, their sizes and their recency (one LRU order over both segments: a segment's LRU is
    its first key in that order); this class knows which keys are in the main segment (the
    rest are in the window) and the request frequencies."""

    def __init__(self, capacity_hint: int, window_fraction: float = WINDOW_FRACTION) -> None:
        if not 0 < window_fraction < 1:
            raise ValueError(f"the window fraction must be in (0, 1), not {window_fraction}")
        self.window_fraction = window_fraction
        self.sketch: FrequencySketch[K] = FrequencySketch.for_capacity(capacity_hint)
        self.main: set[K] = set()

    def record(self, key: K) -> None:
        """A request for ``key``, whether it is loaded or not."""
        self.sketch.increment(key)

    def window_capacity(self, capacity: int) -> int:
        return max(1, round(self.window_fraction * capacity))

    def choose(
        self,
        order: Sequence[K],
        sizes: Mapping[K, int],
        key: K,
        nbytes: int,
        exempt: set[K],
        over: Callable[[int, int], bool],
        max_items: int,
    ) -> list[K] | None:
        """The keys to evict so that ``key`` (``nbytes``, entering the window unless it is in
        main already) fits, none of them in ``exempt``; None when evicting every other key
        cannot make room. ``order``: the cached keys, least recently used first."""
        items = len(order) + (0 if key in sizes else 1)
        total = sum(sizes.values()) - sizes.get(key, 0) + nbytes
        window: deque[K] = deque()
        main: deque[K] = deque()
        window_count = 0 if key in self.main else 1
        for cached in order:
            if cached == key:
                continue
            in_main = cached in self.main
            window_count += not in_main
            if cached not in exempt:
                (main if in_main else window).append(cached)
        capacity = self.window_capacity(max_items or items)
        chosen: list[K] = []
        while over(items, total):
            candidate = window[0] if window and window_count > capacity else None
            victim = main[0] if main else None
            if candidate is not None and victim is not None:
                window.popleft()
                window_count -= 1
                if self.sketch.estimate(candidate) > self.sketch.estimate(victim):
                    evicted = main.popleft()
                    main.append(candidate)  # admitted: now main's most recently used
                else:
                    evicted = candidate
            elif victim is not None:
                evicted = main.popleft()
            elif window:
                evicted = window.popleft()
                window_count -= 1
            else:
                return None
            chosen.append(evicted)
            items -= 1
            total -= sizes[evicted]
        return chosen

    def admitted(self, order: Sequence[K], key: K, max_items: int) -> None:
        """``key`` was put (``order``: the cached keys after it, least recently used first):
        a newcomer joins the window; window models past its capacity move to main while main
        has room (when it has none, `choose` already made them compete for it)."""
        window = [cached for cached in order if cached not in self.main]
        capacity = self.window_capacity(max_items or len(order))
        room = max_items - capacity if max_items else len(order)
        moved = 0
        while len(window) - moved > capacity and len(self.main) < room:
            self.main.add(window[moved])
            moved += 1

    def removed(self, key: K) -> None:
        self.main.discard(key)
