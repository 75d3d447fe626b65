"""The lifecycle's pure decisions (multiserve.policy), checked as properties over generated
scans, caches and failures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from multiserve import policy
from multiserve.catalog import LATEST, Catalog, Ident, Key, VersionRecord
from multiserve.errors import ModelLoadFailed, ModelTooLarge, VersionSettling

NAMES = ("a", "b", "c")
WINDOW = 1.0
NOW = 100.0


@st.composite
def scans(draw: st.DrawFn) -> list[VersionRecord]:
    """A scan: a few versions of a few models, each quiet for some time, some marked."""
    keys = draw(
        st.lists(st.tuples(st.sampled_from(NAMES), st.integers(1, 4)), unique=True, max_size=8)
    )
    return [
        VersionRecord(
            name=name,
            version=version,
            path=Path(name, str(version)),
            backend="onnx",
            artifact="model.onnx",
            fingerprint=draw(st.sampled_from(["f1", "f2"])),
            changed_at=NOW - draw(st.sampled_from([0.0, 0.5, 0.99, 1.0, 5.0])),
            marker=draw(st.booleans()),
            problem=draw(st.sampled_from([None, None, None, "broken"])),
        )
        for name, version in keys
    ]


def settled_catalog(records: list[VersionRecord]) -> Catalog:
    return policy.reconcile(Catalog(), records, NOW, WINDOW, [], {}).catalog


def loaded_keys(records: list[VersionRecord]) -> st.SearchStrategy[list[Key]]:
    return (
        st.lists(st.sampled_from([r.key for r in records]), unique=True) if records else st.just([])
    )


@given(scans(), st.data())
def test_reconcile_settles_quiet_or_marked_versions_and_retires_what_is_gone(
    records: list[VersionRecord], data: st.DataObject
) -> None:
    old = settled_catalog(data.draw(scans()))
    loaded = data.draw(
        st.lists(st.sampled_from([r.key for r in old.records()]), unique=True)
        if old.records()
        else st.just([])
    )
    result = policy.reconcile(old, records, NOW, WINDOW, loaded, {})
    published = {r.key: r for r in result.catalog.records()}
    assert set(published) == {r.key for r in records}
    for record in records:
        quiet = NOW - record.changed_at >= WINDOW
        assert published[record.key].settled == (record.marker or quiet)
    waits = [r.changed_at + WINDOW - NOW for r in records if not published[r.key].settled]
    assert result.next_check == (min(waits) if waits else None)
    assert sorted(result.removed) == sorted(k for k in loaded if k not in published)
    hot = {key[0] for key in loaded}
    for record in result.staged:
        assert record.settled
        assert record.staged
        assert record.name in hot


@given(scans())
def test_a_settled_version_of_a_cold_model_is_never_staged(records: list[VersionRecord]) -> None:
    result = policy.reconcile(Catalog(), records, NOW, WINDOW, [], {})
    assert result.staged == []
    assert not any(r.staged for r in result.catalog.records())


def test_new_files_of_a_loaded_version_are_staged_until_promoted() -> None:
    first = VersionRecord("m", 1, Path("m/1"), "onnx", "model.onnx", fingerprint="old")
    catalog = settled_catalog([first])
    changed = VersionRecord("m", 1, Path("m/1"), "onnx", "model.onnx", fingerprint="new")
    result = policy.reconcile(catalog, [changed], NOW, WINDOW, [("m", 1)], {})
    assert [r.key for r in result.staged] == [("m", 1)]
    # The next scan of the same files keeps it staged (the promotion has not finished).
    again = policy.reconcile(result.catalog, [changed], NOW, WINDOW, [("m", 1)], {})
    assert [r.key for r in again.staged] == [("m", 1)]


@given(scans(), st.data())
def test_latest_is_the_highest_servable_version_and_resolve_agrees(
    records: list[VersionRecord], data: st.DataObject
) -> None:
    catalog = settled_catalog(records)
    loaded = set(data.draw(loaded_keys(records)))
    failed: dict[Ident, ModelLoadFailed | ModelTooLarge] = {
        r.ident: ModelLoadFailed("nope")
        for r in records
        if data.draw(st.booleans(), label=f"fail {r.key}")
    }
    for name in catalog.models:
        servable = [
            r
            for r in catalog.model(name).descending()
            if r.key in loaded or (r.settled and r.problem is None and r.ident not in failed)
        ]
        latest = policy.latest(catalog, name, loaded, failed)
        assert latest == (servable[0] if servable else None)
        if servable:
            assert policy.resolve(catalog, {}, name, LATEST, loaded, failed) == servable
        else:
            with pytest.raises((ModelLoadFailed, VersionSettling)):
                policy.resolve(catalog, {}, name, LATEST, loaded, failed)


@given(
    st.lists(st.tuples(st.sampled_from(NAMES), st.integers(1, 5)), unique=True),
    st.sets(st.tuples(st.sampled_from(NAMES), st.integers(1, 5))),
    st.sets(st.integers(1, 5)),
    st.sampled_from(["latest", "all"]),
)
def test_a_swap_retires_only_unpinned_unlabelled_versions_of_its_own_model(
    loaded: list[Key], pinned: set[Key], labelled: set[int], default: str
) -> None:
    promoted = VersionRecord("a", 3, Path("a/3"), "onnx", "model.onnx")
    retired = policy.superseded(promoted, loaded, pinned, labelled, default)
    if default == "all":
        assert retired == []
        return
    assert set(retired) == {
        k
        for k in loaded
        if k[0] == "a" and k != ("a", 3) and k not in pinned and k[1] not in labelled
    }


@given(
    st.integers(0, 10**10),
    st.floats(0, 3, allow_nan=False),
    st.booleans(),
)
@example(budget=100, ratio=1.1, measured=True)  # over, but within the noise: retried
@example(budget=100, ratio=1.2, measured=True)  # clearly over: remembered
@example(budget=100, ratio=1.1, measured=False)  # a reported figure is no noise: remembered
def test_a_refusal_lasts_only_when_clearly_over_the_budget(
    budget: int, ratio: float, measured: bool
) -> None:
    cost = int(budget * ratio)
    lasts = policy.refusal_lasts(cost, budget, measured)
    if budget == 0 or cost <= budget:
        assert not lasts
    elif not measured:
        assert lasts
    else:
        assert lasts == (cost > budget * (1 + policy.MEASUREMENT_NOISE))
    # More cost never turns a lasting refusal into a retry.
    if lasts:
        assert policy.refusal_lasts(cost + 1, budget, measured)


@given(scans(), st.data())
def test_start_up_waits_for_every_first_scan_version_to_settle_and_every_pin_to_load(
    records: list[VersionRecord], data: st.DataObject
) -> None:
    catalog = settled_catalog(records)
    keys = [r.key for r in records]
    pinned = set(data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([])))
    loaded = set(data.draw(loaded_keys(records)))
    pending = policy.startup_pending(catalog, keys, pinned, loaded, {})
    settling = [r for r in catalog.records() if not r.settled and r.problem is None]
    unloaded_pins = [
        k
        for k in pinned
        if k not in loaded and catalog.find(k).problem is None  # type: ignore[union-attr]
    ]
    assert (pending == []) == (not settling and not unloaded_pins)
    # A pin that failed to load no longer holds start-up.
    failed: dict[Ident, ModelLoadFailed | ModelTooLarge] = {
        catalog.find(k).ident: ModelLoadFailed("x")  # type: ignore[union-attr]
        for k in pinned
    }
    rest = policy.startup_pending(catalog, keys, pinned, loaded, failed)
    assert (rest == []) == (not settling)
