"""ModelCache: a stateful model check against a plain reference, plus named examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from multiserve.cache import CacheBusy, CacheFull, ModelCache

KEYS = ("a", "b", "c", "d", "e")
keys = st.sampled_from(KEYS)
sizes = st.integers(min_value=0, max_value=120)


@dataclass(frozen=True)
class Entry:
    key: str
    nbytes: int
    value: object


V = TypeVar("V")


def snapshot(
    cache: ModelCache[str, V],
) -> tuple[list[tuple[str, V]], int, int, int, frozenset[str]]:
    """Everything observable about ``cache``, to show that a call changed none of it."""
    return (list(cache.items()), cache.total_bytes, cache.hits, cache.misses, cache.pins)


class CacheMachine(RuleBasedStateMachine):
    """Drives a small ModelCache and a reference: a LRU-to-MRU list of entries and a pin set."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: ModelCache[str, object] = ModelCache()
        self.max_items = 0
        self.max_bytes = 0
        self.model: list[Entry] = []
        self.pins: set[str] = set()
        self.hits = 0
        self.misses = 0

    @initialize(
        max_items=st.integers(min_value=0, max_value=4),
        max_bytes=st.integers(min_value=0, max_value=100),
    )
    def setup(self, max_items: int, max_bytes: int) -> None:
        self.cache = ModelCache(max_items=max_items, max_bytes=max_bytes)
        self.max_items = max_items
        self.max_bytes = max_bytes

    # -- the reference ---------------------------------------------------------------------

    def entry(self, key: str) -> Entry | None:
        return next((e for e in self.model if e.key == key), None)

    def fits(self, entries: list[Entry]) -> bool:
        if self.max_items and len(entries) > self.max_items:
            return False
        return not (self.max_bytes and sum(e.nbytes for e in entries) > self.max_bytes)

    def expected_victims(self, key: str, nbytes: int) -> list[str] | None:
        """The shortest LRU-first run of unpinned other keys whose eviction lets ``key`` fit;
        None if evicting all of them is not enough."""
        others = [e for e in self.model if e.key != key]
        candidates = [e.key for e in others if e.key not in self.pins]
        newcomer = Entry(key, nbytes, None)
        for n in range(len(candidates) + 1):
            gone = set(candidates[:n])
            if self.fits([e for e in others if e.key not in gone] + [newcomer]):
                return candidates[:n]
        return None

    def store(self, key: str, nbytes: int, value: object) -> None:
        self.model = [e for e in self.model if e.key != key] + [Entry(key, nbytes, value)]

    # -- rules -----------------------------------------------------------------------------

    def loaded(self, index: int) -> str | None:
        """A loaded key by LRU position (small indexes, which Hypothesis favours, are the LRU)."""
        return self.model[index % len(self.model)].key if self.model else None

    @rule(key=keys, nbytes=sizes)
    def admit(self, key: str, nbytes: int) -> None:
        """What the lifecycle does: ask for victims, evict them, then put."""
        self.check_admit(key, nbytes)

    @rule(index=st.integers(min_value=0, max_value=4), nbytes=sizes)
    def readmit_loaded(self, index: int, nbytes: int) -> None:
        """Replace a loaded model (often the LRU one) at a new size: it is never its own victim."""
        key = self.loaded(index)
        if key is not None:
            self.check_admit(key, nbytes)

    def check_admit(self, key: str, nbytes: int) -> None:
        expected = self.expected_victims(key, nbytes)
        before = snapshot(self.cache)
        if expected is None:
            with pytest.raises(CacheFull):
                self.cache.victims(key, nbytes)
            assert snapshot(self.cache) == before
            with pytest.raises(CacheFull):
                self.cache.put(key, object(), nbytes)
            assert snapshot(self.cache) == before
            return
        victims = self.cache.victims(key, nbytes)
        assert snapshot(self.cache) == before, "victims() must change nothing"
        assert key not in victims
        assert not set(victims) & self.pins, "a pinned key was named as a victim"
        assert victims == expected
        for victim in victims:
            removed = self.entry(victim)
            assert removed is not None
            assert self.cache.remove(victim) is removed.value
            self.model.remove(removed)
        value = object()
        self.cache.put(key, value, nbytes)
        self.store(key, nbytes, value)
        assert self.cache.peek(key) is value

    @rule(key=keys, nbytes=sizes)
    def put_without_evicting(self, key: str, nbytes: int) -> None:
        """put() refuses, changing nothing, rather than break a bound."""
        expected = self.expected_victims(key, nbytes)
        before = snapshot(self.cache)
        value = object()
        if expected is None or expected:
            with pytest.raises(CacheFull):
                self.cache.put(key, value, nbytes)
            assert snapshot(self.cache) == before
        else:
            self.cache.put(key, value, nbytes)
            self.store(key, nbytes, value)

    @rule(key=keys)
    def get(self, key: str) -> None:
        found = self.entry(key)
        got = self.cache.get(key)
        if found is None:
            assert got is None
            self.misses += 1
        else:
            assert got is found.value
            self.hits += 1
            self.model.remove(found)
            self.model.append(found)

    @rule(key=keys)
    def peek(self, key: str) -> None:
        found = self.entry(key)
        assert self.cache.peek(key) is (None if found is None else found.value)

    @rule(index=st.integers(min_value=0, max_value=4))
    def peek_loaded(self, index: int) -> None:
        """peek() of a loaded model (often the LRU one) leaves the LRU order alone."""
        key = self.loaded(index)
        if key is not None:
            self.peek(key)

    @rule(key=keys)
    def remove(self, key: str) -> None:
        found = self.entry(key)
        assert self.cache.remove(key) is (None if found is None else found.value)
        if found is not None:
            self.model.remove(found)

    @rule(key=keys)
    def pin(self, key: str) -> None:
        self.cache.pin(key)
        self.pins.add(key)

    @rule(key=keys)
    def unpin(self, key: str) -> None:
        """Unpinning a key that is not pinned is allowed and changes nothing."""
        self.cache.unpin(key)
        self.pins.discard(key)

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def within_bounds(self) -> None:
        if self.max_items:
            assert len(self.cache) <= self.max_items
        if self.max_bytes:
            assert self.cache.total_bytes <= self.max_bytes

    @invariant()
    def matches_the_reference(self) -> None:
        assert [(k, v) for k, v in self.cache.items()] == [(e.key, e.value) for e in self.model]
        assert self.cache.keys() == [e.key for e in self.model]
        assert len(self.cache) == len(self.model)
        assert self.cache.total_bytes == sum(e.nbytes for e in self.model)
        for e in self.model:
            assert e.key in self.cache
            assert self.cache.nbytes(e.key) == e.nbytes

    @invariant()
    def pins_match(self) -> None:
        assert self.cache.pins == frozenset(self.pins)
        for key in KEYS:
            assert self.cache.is_pinned(key) == (key in self.pins)

    @invariant()
    def counters_match(self) -> None:
        assert (self.cache.hits, self.cache.misses) == (self.hits, self.misses)


CacheMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCase = CacheMachine.TestCase


# -- examples ------------------------------------------------------------------------------


def filled(max_items: int = 0, max_bytes: int = 0, **sizes: int) -> ModelCache[str, str]:
    cache: ModelCache[str, str] = ModelCache(max_items=max_items, max_bytes=max_bytes)
    for key, nbytes in sizes.items():
        cache.put(key, key.upper(), nbytes)
    return cache


def test_lru_order_decides_the_victims() -> None:
    cache = filled(max_items=3, a=1, b=1, c=1)
    assert cache.get("a") == "A"
    assert cache.victims("d", 1) == ["b"]
    cache.remove("b")
    cache.put("d", "D", 1)
    assert [k for k, _ in cache.items()] == ["c", "a", "d"]


def test_peek_does_not_refresh_a_model() -> None:
    cache = filled(max_items=2, a=1, b=1)
    assert cache.peek("a") == "A"
    assert cache.peek("zz") is None
    assert cache.victims("c", 1) == ["a"]
    assert (cache.hits, cache.misses) == (0, 0)


def test_get_counts_hits_and_misses() -> None:
    cache = filled(a=1)
    assert cache.get("a") == "A"
    assert cache.get("b") is None
    assert cache.get("a") == "A"
    assert (cache.hits, cache.misses) == (2, 1)


def test_pinned_model_is_never_a_victim() -> None:
    cache = filled(max_items=2, a=1, b=1)
    cache.pin("a")
    assert cache.victims("c", 1) == ["b"]
    cache.pin("b")
    with pytest.raises(CacheFull):
        cache.victims("c", 1)
    cache.unpin("a")
    assert not cache.is_pinned("a")
    assert cache.victims("c", 1) == ["a"]


def test_model_larger_than_the_whole_budget_is_refused_and_nothing_is_evicted() -> None:
    cache = filled(max_bytes=100, a=50, b=10)
    before = snapshot(cache)
    with pytest.raises(CacheFull, match="101"):
        cache.victims("c", 101)
    with pytest.raises(CacheFull):
        cache.put("c", "C", 101)
    assert snapshot(cache) == before


def test_byte_budget_counts_bytes_not_models() -> None:
    cache = filled(max_bytes=100, a=60, b=30)
    assert cache.victims("c", 10) == []
    assert cache.victims("c", 11) == ["a"]
    assert cache.victims("c", 70) == ["a"]
    assert cache.victims("c", 71) == ["a", "b"]
    assert cache.victims("c", 100) == ["a", "b"]


def test_item_budget_counts_models_not_bytes() -> None:
    cache = filled(max_items=2, a=10**9, b=0)
    assert cache.victims("b", 10**9) == []
    assert cache.victims("c", 0) == ["a"]


def test_pins_apply_to_keys_loaded_later() -> None:
    cache: ModelCache[str, str] = ModelCache(max_items=1)
    cache.pin("a")
    cache.put("a", "A", 1)
    with pytest.raises(CacheFull):
        cache.victims("b", 1)
    cache.remove("a")
    assert cache.is_pinned("a"), "a pin outlives the model it protects"


def test_replacing_a_model_counts_only_its_new_size_and_never_evicts_itself() -> None:
    cache = filled(max_bytes=100, a=60, b=30)
    assert cache.victims("a", 70) == []
    assert cache.victims("a", 71) == ["b"]
    cache.remove("b")
    cache.put("a", "A2", 100)
    assert list(cache.items()) == [("a", "A2")]
    assert cache.total_bytes == 100


def test_put_refuses_to_break_a_bound_when_victims_were_not_evicted() -> None:
    cache = filled(max_items=1, a=1)
    with pytest.raises(CacheFull):
        cache.put("b", "B", 1)
    assert cache.keys() == ["a"]


def test_zero_bounds_mean_unbounded() -> None:
    cache = filled(**{k: 10**12 for k in "abcdefgh"})
    assert cache.victims("z", 10**12) == []
    assert len(cache) == 8


def test_negative_bounds_are_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        ModelCache(max_items=-1)
    with pytest.raises(ValueError, match=">= 0"):
        ModelCache(max_bytes=-1)


def test_negative_sizes_are_refused() -> None:
    cache: ModelCache[str, int] = ModelCache(max_bytes=100)
    with pytest.raises(ValueError, match="cannot cost -50 bytes"):
        cache.put("a", 1, -50)
    assert len(cache) == 0


@given(
    sizes_=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=5),
    protected=st.sets(st.sampled_from(KEYS)),
    max_items=st.integers(min_value=1, max_value=4),
    incoming=st.integers(min_value=0, max_value=30),
)
def test_protected_keys_are_never_victims_and_their_room_makes_admission_wait(
    sizes_: list[int], protected: set[str], max_items: int, incoming: int
) -> None:
    cache: ModelCache[str, int] = ModelCache(max_items=max_items, max_bytes=60)
    for key, nbytes in zip(KEYS, sizes_, strict=False):
        try:
            for victim in cache.victims(key, nbytes):
                cache.remove(victim)
            cache.put(key, 0, nbytes)
        except CacheFull:
            pass
    for key in protected:
        cache.protect(key)
    try:
        victims = cache.victims("new", incoming)
    except CacheBusy:
        # It would fit once the protections lift, and then it does.
        for key in protected:
            cache.unprotect(key)
        assert cache.victims("new", incoming) is not None
    except CacheFull:
        pass
    else:
        assert not set(victims) & protected
    cache.remove("a")
    assert "a" not in cache.protected
