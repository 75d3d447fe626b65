"""W-TinyLFU (`multiserve.tinylfu`) through ModelCache: bounds, pins, admission, scans."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from multiserve.cache import CacheFull, ModelCache
from multiserve.tinylfu import FrequencySketch, WindowTinyLfu

KEYS = [f"m{i}" for i in range(12)]

operations = st.lists(
    st.tuples(
        st.sampled_from(["load", "load", "load", "pin", "unpin", "remove", "protect"]),
        st.sampled_from(KEYS),
        st.integers(min_value=0, max_value=40),
    ),
    max_size=120,
)


def load(cache: ModelCache[str, int], key: str, nbytes: int) -> list[str]:
    """What the lifecycle does on a request: look up, and on a miss evict and admit."""
    if cache.get(key) is not None:
        return []
    victims = cache.victims(key, nbytes)
    for victim in victims:
        cache.remove(victim)
    cache.put(key, 0, nbytes)
    return victims


@settings(max_examples=200)
@given(
    ops=operations,
    max_items=st.integers(min_value=0, max_value=6),
    max_bytes=st.integers(min_value=0, max_value=120),
)
def test_bounds_hold_pins_and_protections_are_exempt_and_a_miss_is_always_admitted(
    ops: list[tuple[str, str, int]], max_items: int, max_bytes: int
) -> None:
    cache: ModelCache[str, int] = ModelCache(max_items, max_bytes, policy="tinylfu")
    for op, key, nbytes in ops:
        if op == "load":
            exempt = cache.pins | cache.protected
            before = (list(cache.items()), cache.keys())
            try:
                victims = load(cache, key, nbytes)
            except CacheFull:
                assert (list(cache.items()), cache.keys()) == before  # nothing changed
                continue
            assert key in cache  # the newcomer serves, whatever the sketch thinks of it
            assert not set(victims) & exempt
            assert key not in victims
        elif op == "pin":
            cache.pin(key)
        elif op == "unpin":
            cache.unpin(key)
        elif op == "remove":
            cache.remove(key)
        elif key in cache:
            cache.protect(key)
        if max_items:
            assert len(cache) <= max_items
        if max_bytes:
            assert cache.total_bytes <= max_bytes
        assert all(cache.segment(k) in ("window", "main") for k in cache)


@settings(max_examples=100)
@given(
    capacity=st.integers(min_value=3, max_value=30),
    hot_share=st.floats(min_value=0.1, max_value=1.0),
    rounds=st.integers(min_value=3, max_value=8),
    scan_factor=st.integers(min_value=1, max_value=6),
)
def test_a_one_off_scan_does_not_evict_the_hot_set(
    capacity: int, hot_share: float, rounds: int, scan_factor: int
) -> None:
    # The hot set fills the main segment (the cache less its window); each of its models is
    # asked for several times. Then a scan asks for many models once each: under tinylfu
    # they pass through the window and every hot model stays loaded.
    window = WindowTinyLfu[str](capacity).window_capacity(capacity)
    hot = [f"hot{i}" for i in range(max(1, int(hot_share * (capacity - window))))]
    cache: ModelCache[str, int] = ModelCache(max_items=capacity, policy="tinylfu")
    for _ in range(rounds):
        for key in hot:
            load(cache, key, 1)
    for index in range(scan_factor * capacity):
        load(cache, f"scan{index}", 1)
    assert all(key in cache for key in hot)


def test_the_same_scan_flushes_the_hot_set_out_of_an_lru() -> None:
    # The contrast, and why the policy exists.
    cache: ModelCache[str, int] = ModelCache(max_items=10, policy="lru")
    hot = [f"hot{i}" for i in range(8)]
    for _ in range(5):
        for key in hot:
            load(cache, key, 1)
    for index in range(20):
        load(cache, f"scan{index}", 1)
    assert not any(key in cache for key in hot)


def test_a_newcomer_asked_for_more_often_than_the_main_victim_takes_its_place() -> None:
    cache: ModelCache[str, int] = ModelCache(max_items=3, policy="tinylfu")
    for key in ("a", "b", "c"):
        load(cache, key, 1)
    for _ in range(5):
        cache.get("d")  # asked for (say, while it loads) more than anything loaded
    victims = load(cache, "d", 1)  # d joins the window; the window's c competes and loses
    assert victims == ["c"]
    for _ in range(5):
        cache.get("e")
    victims = load(cache, "e", 1)  # now d (5 requests) competes with main's LRU, a (1)
    assert victims == ["a"]
    assert cache.segment("d") == "main"
    assert cache.segment("e") == "window"


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=300))
def test_the_sketch_never_underestimates_before_it_ages(keys: list[int]) -> None:
    sketch: FrequencySketch[int] = FrequencySketch(256, 10_000)
    counts: dict[int, int] = {}
    for key in keys:
        sketch.increment(key)
        counts[key] = counts.get(key, 0) + 1
    for key, count in counts.items():
        assert sketch.estimate(key) >= min(count, 63)


def test_the_sketch_ages_by_halving() -> None:
    sketch: FrequencySketch[str] = FrequencySketch(256, 40)
    for _ in range(20):
        sketch.increment("old")
    for index in range(20):
        sketch.increment(f"new{index % 4}")
    assert sketch.resets == 1
    assert sketch.estimate("old") == 10
