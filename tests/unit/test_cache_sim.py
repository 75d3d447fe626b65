"""benchmarks/cache_sim.py: Belady's MIN is the ceiling every policy it reports stays under."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.cache_sim import belady_hit_rate, hindsight_lfu_hit_rate, policy_hit_rate


@settings(max_examples=60, deadline=None)
@given(
    trace=st.lists(st.integers(min_value=0, max_value=15), min_size=1, max_size=300),
    capacity=st.integers(min_value=1, max_value=8),
)
def test_no_policy_beats_belady(trace: list[int], capacity: int) -> None:
    best = belady_hit_rate(trace, capacity)
    for rate in (
        policy_hit_rate(trace, capacity, "lru"),
        policy_hit_rate(trace, capacity, "tinylfu"),
        hindsight_lfu_hit_rate(trace, capacity),
    ):
        assert 0.0 <= rate <= best + 1e-12


def test_a_cache_that_holds_everything_misses_only_the_first_requests() -> None:
    trace = [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    expected = 6 / 10  # four first requests miss, the six repeats hit
    for rate in (
        belady_hit_rate(trace, 4),
        policy_hit_rate(trace, 4, "lru"),
        policy_hit_rate(trace, 4, "tinylfu"),
        hindsight_lfu_hit_rate(trace, 4),
    ):
        assert rate == expected
