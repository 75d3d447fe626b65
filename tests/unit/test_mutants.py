"""Rules of the pure modules that the behavioural unit tests left unstated, each found by a
mutant that survived them (`make mutation`): exact boundaries, which error a request gets and
what its message says (messages are part of the interface: clients and operators read them)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from multiserve import batching, codecs, npy, policy
from multiserve.cache import CacheFull, ModelCache
from multiserve.catalog import LATEST, Catalog, VersionRecord
from multiserve.errors import (
    InvalidInput,
    MalformedRequest,
    ModelLoadFailed,
    ModelNotFound,
    ModelTooLarge,
    NotAcceptable,
    UnsupportedMediaType,
    VersionNotFound,
    VersionSettling,
)
from multiserve.types import Array, ModelMetadata, TensorSpec
from tests.unit.test_batching import Doubler, job, queued_while_blocked, until


def record(version: int, **fields: object) -> VersionRecord:
    return VersionRecord(
        name="m",
        version=version,
        path=Path("m", str(version)),
        backend="onnx",
        artifact="model.onnx",
        fingerprint=f"f{version}",
        **fields,  # type: ignore[arg-type]
    )


# --- policy -------------------------------------------------------------------------------


def test_a_label_resolves_to_its_version_whatever_latest_is() -> None:
    catalog = Catalog.from_records([record(1), record(2)])
    labels = {"m": {"stable": 1}, "other": {"stable": 2}}
    assert policy.resolve(catalog, labels, "m", "stable", set(), {}) == [record(1)]
    assert policy.resolve(catalog, labels, "m", LATEST, set(), {}) == [record(2), record(1)]


def test_a_label_pointing_at_a_removed_version_is_404_naming_it() -> None:
    catalog = Catalog.from_records([record(1)])
    with pytest.raises(VersionNotFound) as caught:
        policy.resolve(catalog, {"m": {"stable": 5}}, "m", "stable", set(), {})
    assert caught.value.message == (
        "label 'stable' of 'm' points to version 5, which is not in the repository"
    )


def test_latest_of_versions_all_settling_is_503_settling() -> None:
    catalog = Catalog.from_records([record(1, settled=False), record(2, settled=False)])
    with pytest.raises(VersionSettling) as caught:
        policy.resolve(catalog, {}, "m", LATEST, set(), {})
    assert caught.value.message == "model 'm' has no version ready yet: still settling"


def test_latest_of_versions_that_all_failed_names_the_newest_settled_error() -> None:
    failed = ModelLoadFailed("m version 2: boom")
    catalog = Catalog.from_records(
        [record(1, problem="bad config"), record(2), record(3, settled=False)]
    )
    with pytest.raises(ModelLoadFailed) as caught:
        policy.resolve(catalog, {}, "m", LATEST, set(), {("m", 2, "f2"): failed})
    assert caught.value.message == (
        "model 'm' has no version that loads; newest error: m version 2: boom"
    )
    only_problem = Catalog.from_records([record(1, problem="bad config")])
    with pytest.raises(ModelLoadFailed) as caught:
        policy.resolve(only_problem, {}, "m", LATEST, set(), {})
    assert caught.value.message == "model 'm' has no version that loads; newest error: bad config"
    # Staged and not loaded: settled, no problem, no failure; still not servable.
    with pytest.raises(ModelLoadFailed):
        policy.resolve(Catalog.from_records([record(1, staged=True)]), {}, "m", LATEST, set(), {})


@pytest.mark.parametrize(
    ("cost", "budget", "measured", "lasts"),
    [
        (10, 0, False, False),  # no budget: nothing is ever refused for good
        (2, 1, False, True),  # reported and over, by a byte
        (100, 100, False, False),  # exactly the budget fits
        (23, 20, True, False),  # measured, exactly at the noise margin: may be noise
        (24, 20, True, True),  # measured, past the margin
        (21, 20, True, False),
    ],
)
def test_refusal_boundaries(cost: int, budget: int, measured: bool, lasts: bool) -> None:
    assert 20 * (1 + policy.MEASUREMENT_NOISE) == 23  # the margin, exactly
    assert policy.refusal_lasts(cost, budget, measured) is lasts


def test_state_of_each_kind_of_version() -> None:
    def state(rec: VersionRecord, **kw: object) -> tuple[policy.VersionState, str | None]:
        args: dict[str, object] = {
            "loaded": False,
            "loading": False,
            "downloading": False,
            "failure": None,
            **kw,
        }
        return policy.state(rec, **args)  # type: ignore[arg-type]

    S = policy.VersionState
    assert state(record(1, problem="two artifacts"), loaded=True) == (S.FAILED, "two artifacts")
    assert state(record(1), loaded=True, failure="new files failed") == (
        S.READY,
        "new files failed",
    )
    assert state(record(1), loading=True, failure="x") == (S.LOADING, None)
    assert state(record(1), loading=True, downloading=True) == (S.DOWNLOADING, None)
    assert state(record(1), failure="boom") == (S.FAILED, "boom")
    assert state(record(1, settled=False)) == (S.SETTLING, None)
    assert state(record(1)) == (S.AVAILABLE, None)
    assert [s.value for s in S] == [
        "settling",
        "available",
        "downloading",
        "loading",
        "ready",
        "failed",
    ]


def test_may_serve_loaded_only_its_own_files_or_while_new_ones_cannot_serve() -> None:
    assert policy.may_serve_loaded("f1", record(1), set())
    assert not policy.may_serve_loaded("old", record(1), set())
    assert policy.may_serve_loaded("old", record(1, staged=True), set())
    assert policy.may_serve_loaded("old", record(1, settled=False), set())
    assert policy.may_serve_loaded("old", record(1), {("m", 1, "f1")})


def test_unavailable_says_why_a_version_cannot_load() -> None:
    assert policy.unavailable(record(1), {}) is None
    problem = policy.unavailable(record(1, problem="two artifacts"), {})
    assert isinstance(problem, ModelLoadFailed)
    assert problem.message == "two artifacts"
    too_large = policy.unavailable(record(1), {("m", 1, "f1"): ModelTooLarge("too big")})
    assert type(too_large) is ModelTooLarge
    assert too_large.message == "too big"
    settling = policy.unavailable(record(1, settled=False), {})
    assert isinstance(settling, VersionSettling)
    assert settling.message == "m version 1 is still being written (settling)"


# --- catalog and cache --------------------------------------------------------------------


def test_with_record_replaces_only_the_record_of_its_key() -> None:
    catalog = Catalog.from_records([record(1), record(2)])
    replaced = catalog.with_record(record(2, staged=True))
    assert replaced.find(("m", 2)) == record(2, staged=True)
    assert replaced.find(("m", 1)) == record(1)
    assert catalog.find(("m", 2)) == record(2)  # the old snapshot is unchanged
    added = catalog.with_record(VersionRecord("n", 1, Path("n/1"), "onnx", "model.onnx"))
    assert sorted(r.key for r in added.records()) == [("m", 1), ("m", 2), ("n", 1)]


def test_candidates_errors_name_what_exists() -> None:
    catalog = Catalog.from_records([record(1), record(3)])
    with pytest.raises(VersionNotFound) as caught:
        catalog.candidates("m", "2")
    assert caught.value.message == "model 'm' has no version '2'; versions: 1, 3 (or 'latest')"
    with pytest.raises(VersionNotFound):
        catalog.candidates("m", "stable")
    with pytest.raises(ModelNotFound) as missing:
        catalog.candidates("nope", LATEST)
    assert missing.value.message == "model 'nope' not found"
    assert catalog.candidates("m", "3") == [record(3)]
    empty = Catalog.from_records([])
    assert empty.models == {}


def test_cache_iterates_least_recently_used_first_as_a_snapshot() -> None:
    cache: ModelCache[str, int] = ModelCache()
    for key in "abc":
        cache.put(key, 0, 1)
    cache.get("a")
    keys = iter(cache)
    cache.remove("b")  # the iterator is a snapshot
    assert list(keys) == ["b", "c", "a"]
    assert list(cache) == ["c", "a"]


def test_cache_full_messages_name_the_budget_and_the_pins() -> None:
    cache: ModelCache[str, int] = ModelCache(max_items=1, max_bytes=100)
    with pytest.raises(CacheFull) as caught:
        cache.victims("x", 101)
    assert str(caught.value) == "needs 101 bytes, more than the whole budget of 100"
    cache.put("p", 0, 60)
    cache.pin("p")
    with pytest.raises(CacheFull) as caught:
        cache.victims("x", 50)
    assert str(caught.value) == (
        "needs 50 bytes; pinned models hold 60 bytes of the 100 byte budget and 1 of 1 slots"
    )
    unbounded: ModelCache[str, int] = ModelCache(max_items=1)
    unbounded.put("p", 0, 5)
    unbounded.pin("p")
    with pytest.raises(CacheFull) as caught:
        unbounded.victims("x", 5)
    assert str(caught.value) == (
        "needs 5 bytes; pinned models hold 5 bytes of the unbounded byte budget and 1 of 1 slots"
    )
    with pytest.raises(ValueError, match="cannot cost -1 bytes"):
        cache.victims("x", -1)
    with pytest.raises(ValueError, match="0 means unbounded"):
        ModelCache(max_items=-1)


# --- codecs -------------------------------------------------------------------------------

ONE = ModelMetadata(
    inputs=(TensorSpec("x", "float32", (-1, 2)),), outputs=(TensorSpec("y", "float32", (-1, 2)),)
)
TWO = ModelMetadata(
    inputs=(TensorSpec("a", "int8", (-1,)), TensorSpec("b", "string", (-1,))),
    outputs=(TensorSpec("y", "float32", (-1,)),),
)


@pytest.mark.parametrize(
    ("content_type", "kind"),
    [
        ("", codecs.JSON),
        ("application/json", codecs.JSON),
        ("Application/JSON; charset=utf-8", codecs.JSON),
        ("  application/x-npy ", codecs.NPY),
        ("application/x-npy;v=1", codecs.NPY),
    ],
)
def test_body_kind_of_supported_types(content_type: str, kind: str) -> None:
    assert codecs.body_kind(content_type) == kind


def test_body_kind_refuses_others_with_a_hint_for_curl() -> None:
    with pytest.raises(UnsupportedMediaType) as caught:
        codecs.body_kind("text/plain; charset=utf-8")
    assert caught.value.message == (
        "content type 'text/plain' is not supported; send application/json or application/x-npy"
    )
    with pytest.raises(UnsupportedMediaType) as caught:
        codecs.body_kind("application/x-www-form-urlencoded")
    assert caught.value.message.endswith(
        " (curl -d sends this type: add -H 'Content-Type: application/json')"
    )


def test_decode_json_errors() -> None:
    with pytest.raises(MalformedRequest) as caught:
        codecs.decode_json(b"{", ONE)
    assert caught.value.message.startswith("request body is not valid JSON: ")
    for body in (b"[1]", b'{"input": 1}'):
        with pytest.raises(MalformedRequest) as caught:
            codecs.decode_json(body, ONE)
        assert caught.value.message == 'expected a JSON object {"inputs": ...}'
    with pytest.raises(InvalidInput) as invalid:
        codecs.decode_json(b'{"inputs": [1, 2]}', TWO)
    assert invalid.value.message == (
        "the model has 2 inputs ('a', 'b'): send {\"inputs\": {\"<input name>\": [...], ...}}"
    )
    named = codecs.decode_json(b'{"inputs": {"a": [1, -2], "b": ["x", "y"]}}', TWO)
    assert named["a"].dtype == np.int8
    assert named["a"].tolist() == [1, -2]
    assert named["b"].tolist() == ["x", "y"]
    bare = codecs.decode_json(b'{"inputs": [[1, 2]]}', ONE)
    assert bare["x"].dtype == np.float32


def test_decode_npy_errors_and_single_input_rule() -> None:
    with pytest.raises(InvalidInput) as invalid:
        codecs.decode_npy(npy.save(np.zeros(2, np.int8)), TWO)
    assert invalid.value.message == (
        "application/x-npy bodies are for single-input models; this model has inputs 'a', 'b': "
        "send JSON"
    )
    with pytest.raises(MalformedRequest) as caught:
        codecs.decode_npy(b"not npy", ONE)
    assert caught.value.message.startswith("request body is not a valid .npy file: ")
    decoded = codecs.decode_npy(npy.save(np.ones((3, 2), np.float64)), ONE)
    assert decoded["x"].dtype == np.float32
    assert decoded["x"].shape == (3, 2)


def test_check_inputs_names_unknown_and_missing_inputs() -> None:
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({"a": [1], "b": ["x"], "c": [1], "d": [2]}, TWO)
    assert caught.value.message == "unknown input 'c', 'd'; the model's inputs are 'a', 'b'"
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({"a": [1]}, TWO)
    assert caught.value.message == "missing input 'b'"
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({}, TWO)
    assert caught.value.message == "missing input 'a', 'b'"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[1, 2], [3]], "input 'x': not a rectangular array (nested lists of unequal lengths?)"),
        ([["a", "b"]], "input 'x': expected float32 values, got strings"),
        ([[1, 2, 3]], "input 'x': expected shape [-1, 2], got [1, 3]"),
        ([1, 2], "input 'x': expected shape [-1, 2], got [2]"),
        (
            [[{"a": 1}, 2]],
            "input 'x': expected float32 values, got values of mixed or unsupported types",
        ),
    ],
)
def test_to_array_errors(value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({"x": value}, ONE)
    assert caught.value.message == message


def test_integers_are_range_checked_and_fixed_dimensions_enforced() -> None:
    spec = ModelMetadata(
        inputs=(TensorSpec("i", "int8", (2, -1)),), outputs=(TensorSpec("y", "int8", (-1,)),)
    )
    ok = codecs.check_inputs({"i": [[-128, 127], [0, 1]]}, spec)["i"]
    assert ok.dtype == np.int8
    for bad in ([[-129, 0], [0, 0]], [[0, 128], [0, 0]]):
        with pytest.raises(InvalidInput) as caught:
            codecs.check_inputs({"i": bad}, spec)
        assert caught.value.message == "input 'i': values out of range for int8 [-128, 127]"
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({"i": [[1, 2]]}, spec)
    assert caught.value.message == "input 'i': expected shape [2, -1], got [1, 2]"
    with pytest.raises(InvalidInput):
        codecs.check_inputs({"i": [[1.5, 2], [1, 2]]}, spec)  # floats are not integers
    empty = codecs.check_inputs({"i": np.zeros((2, 0), np.int64)}, spec)["i"]
    assert empty.dtype == np.int8
    assert empty.shape == (2, 0)
    unsigned = ModelMetadata(
        inputs=(TensorSpec("u", "uint8", (-1,)),), outputs=(TensorSpec("y", "uint8", (-1,)),)
    )
    assert codecs.check_inputs({"u": [0, 255]}, unsigned)["u"].dtype == np.uint8
    with pytest.raises(InvalidInput):
        codecs.check_inputs({"u": [-1]}, unsigned)


def test_string_inputs_take_only_strings() -> None:
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({"a": [1], "b": [True]}, TWO)
    assert caught.value.message == "input 'b': expected string values, got booleans"
    for value, kind in (
        (np.ones(1, np.int16), "integers"),
        (np.ones(1, np.uint8), "integers"),
        (np.ones(1, np.float64), "floats"),
    ):
        with pytest.raises(InvalidInput) as caught:
            codecs.check_inputs({"a": [1], "b": value}, TWO)
        assert caught.value.message == f"input 'b': expected string values, got {kind}"


def test_an_input_array_is_used_as_is_when_it_already_fits() -> None:
    x = np.ones((2, 2), np.float32)
    assert codecs.check_inputs({"x": x}, ONE)["x"] is x


def test_encode_json_and_npy() -> None:
    outputs = {"y": np.arange(4, dtype=np.float32).reshape(2, 2)}
    body = codecs.encode_json("m", 3, outputs)
    assert body == b'{"model_name":"m","model_version":"3","outputs":{"y":[[0.0,1.0],[2.0,3.0]]}}'
    strided = {"y": np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2], "s": np.str_("a")}
    assert codecs.dumps(strided) == b'{"y":[[0,2],[3,5]],"s":"a"}'
    with pytest.raises(TypeError) as refused:
        codecs.dumps({"o": object()})
    assert str(refused.value.__cause__) == "cannot serialise object as JSON"
    assert npy.load(codecs.encode_npy(outputs, None)).tolist() == [[0.0, 1.0], [2.0, 3.0]]
    two = {"y": np.zeros(1), "z": np.ones(1)}
    assert npy.load(codecs.encode_npy(two, "z")).tolist() == [1.0]
    with pytest.raises(NotAcceptable) as caught:
        codecs.encode_npy(two, None)
    assert caught.value.message == (
        "the model has 2 outputs (y, z); an application/x-npy response holds one: add "
        "?output=<name>, or accept application/json"
    )
    with pytest.raises(InvalidInput) as unknown:
        codecs.encode_npy(two, "w")
    assert unknown.value.message == "unknown output 'w'; outputs: y, z"


def test_content_types_with_several_parameters_are_read_by_their_first_part() -> None:
    assert codecs.body_kind("application/json; charset=utf-8; q=1") == codecs.JSON


def test_dumps_writes_float32_arrays_at_their_own_precision() -> None:
    # orjson's numpy mode writes a float32 as the shortest float32 text; through tolist()
    # it would be widened to float64 first (0.10000000149011612).
    assert codecs.dumps({"y": np.asarray([0.1], np.float32)}) == b'{"y":[0.1]}'


# --- policy, second pass ------------------------------------------------------------------


def test_a_newer_version_of_a_hot_model_is_staged_an_older_one_is_not() -> None:
    old = policy.reconcile(Catalog(), [record(2)], 0.0, 0.0, [], {}).catalog
    loaded = [("m", 2)]
    newer = policy.reconcile(old, [record(2), record(3)], 0.0, 0.0, loaded, {})
    assert [r.key for r in newer.staged] == [("m", 3)]
    older = policy.reconcile(old, [record(1), record(2)], 0.0, 0.0, loaded, {})
    assert older.staged == []


def test_new_files_for_the_served_but_unloaded_version_are_not_staged() -> None:
    # v1 loaded, v2 the latest (available, cold): new files for v2 make it latest at once.
    old = policy.reconcile(Catalog(), [record(1), record(2)], 0.0, 0.0, [], {}).catalog
    changed = dataclasses.replace(record(2), fingerprint="new")
    result = policy.reconcile(old, [record(1), changed], 0.0, 0.0, [("m", 1)], {})
    assert result.staged == []


def test_a_failed_version_is_not_restaged_by_every_scan() -> None:
    old = policy.reconcile(Catalog(), [record(1), record(2)], 0.0, 0.0, [], {}).catalog
    failures = {("m", 2, "f2"): ModelLoadFailed("boom")}
    again = policy.reconcile(old, [record(1), record(2)], 0.0, 0.0, [("m", 1)], failures)
    assert again.staged == []


def test_startup_pending_phrases() -> None:
    catalog = Catalog.from_records(
        [
            record(1, settled=False),
            record(2, settled=False),
            VersionRecord("n", 4, Path("n/4"), "onnx", "model.onnx", fingerprint="g"),
        ]
    )
    pins = [("n", 4), ("m", 1)]
    pending = policy.startup_pending(catalog, [("m", 2), ("m", 1)], pins, set(), set())
    assert pending == [
        "settling: m version 1, m version 2",
        "loading pinned: m version 1, n version 4",
    ]


# --- cache and catalog, second pass -------------------------------------------------------


def test_cache_messages_for_unbounded_slots_and_putting_without_evicting() -> None:
    cache: ModelCache[str, int] = ModelCache(max_bytes=100)
    cache.put("p", 0, 60)
    cache.pin("p")
    with pytest.raises(CacheFull) as caught:
        cache.victims("x", 50)
    assert str(caught.value).endswith("of the 100 byte budget and 1 of unbounded slots")
    cache.unpin("p")
    with pytest.raises(CacheFull) as refused:
        cache.put("x", 0, 50)
    assert str(refused.value) == "evict the victims before putting"
    with pytest.raises(ValueError, match="0 means") as negative:
        ModelCache(max_bytes=-1)
    assert str(negative.value) == "cache bounds must be >= 0 (0 means unbounded)"


def test_catalog_models_know_their_names_and_an_empty_model_has_no_latest() -> None:
    from types import MappingProxyType

    from multiserve.catalog import ModelRecord

    assert Catalog.from_records([record(1)]).model("m").name == "m"
    empty = Catalog(MappingProxyType({"m": ModelRecord("m", MappingProxyType({}))}))
    with pytest.raises(VersionNotFound) as caught:
        empty.candidates("m", LATEST)
    assert caught.value.message == "model 'm' has no versions"


# --- npy ------------------------------------------------------------------------------------


def npy_with_version(array: np.ndarray, major: int) -> bytes:
    """``array`` as an .npy file of format ``major``.0 (numpy writes 1.0 unless it must)."""
    v1 = npy.save(array)
    header_length = int.from_bytes(v1[8:10], "little")
    header = v1[10 : 10 + header_length]
    if major == 1:
        return v1
    return (
        b"\x93NUMPY"
        + bytes([major, 0])
        + len(header).to_bytes(4, "little")
        + header
        + v1[10 + header_length :]
    )


@pytest.mark.parametrize("major", [1, 2, 3])
def test_plain_bodies_are_read_in_place_whatever_the_format_version(major: int) -> None:
    """The fast path: the array is a read-only view of the body (np.load would copy it into a
    writeable array): the contract that makes a large request cost no copy."""
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    loaded = npy.load(npy_with_version(array, major))
    assert loaded.tolist() == array.tolist()
    assert not loaded.flags.writeable
    empty = npy.load(npy_with_version(np.zeros((0, 3), np.float32), major))
    assert empty.shape == (0, 3)
    assert not empty.flags.writeable


def test_bodies_numpy_must_judge_go_to_numpy() -> None:
    array = np.arange(4, dtype=np.float32)
    body = npy.save(array)
    trailing = npy.load(body + b"\x00\x00\x00\x00")  # numpy's answer: the array, a copy
    assert trailing.tolist() == array.tolist()
    assert trailing.flags.writeable
    with pytest.raises(ValueError, match=r"declares shape \(4,\) of float32 \(16 bytes\) but 12"):
        npy.load(body[:-4])  # truncated: refused before numpy allocates
    fortran = io.BytesIO()
    np.save(fortran, np.asfortranarray(np.ones((2, 2), np.float32)))
    loaded = npy.load(fortran.getvalue())
    assert loaded.flags.writeable  # numpy's own reader answered
    archive = io.BytesIO()
    np.savez(archive, a=array)
    with pytest.raises(ValueError, match="npz") as caught:
        npy.load(archive.getvalue())
    assert str(caught.value) == "an .npz archive, not a single array"


def test_object_arrays_are_refused_as_numpy_refuses_them() -> None:
    with pytest.raises(ValueError, match="allow_pickle=False"):
        npy.save(np.array([{"a": 1}], dtype=object))


# --- batching -------------------------------------------------------------------------------


def sig(rows: int, width: int = 1) -> batching._Shape:
    return ((("x", np.dtype(np.float32), (width,)),), rows)


def test_signature_of_jobs_that_can_share_a_call() -> None:
    x = np.zeros((3, 2), np.float32)
    wide = np.zeros((3, 4), np.int64)
    assert batching._signature({"x": x, "w": wide}) == (
        (("x", np.dtype(np.float32), (2,)), ("w", np.dtype(np.int64), (4,))),
        3,
    )
    assert batching._signature({}) is None
    assert batching._signature({"s": np.zeros((), np.float32)}) is None  # a scalar
    assert batching._signature({"x": x, "y": np.zeros((2, 2), np.float32)}) is None


def test_batch_end_groups_runs_of_one_signature_up_to_max_rows() -> None:
    same = [sig(1), sig(1), sig(1), sig(2, width=2)]
    assert batching._batch_end(same, 0, 8) == 3  # the other signature starts a new call
    assert batching._batch_end(same, 1, 8) == 3
    assert batching._batch_end(same, 3, 8) == 4
    assert batching._batch_end(same, 0, 2) == 2  # two rows at most
    assert batching._batch_end(same, 1, 1) == 2  # max 1: one job per call
    assert batching._batch_end([None, sig(1)], 0, 8) == 1
    assert batching._batch_end([sig(9), sig(1)], 0, 8) == 1  # too many rows alone
    # Jobs of no rows fit anywhere: behind a full first job, and with max_rows 1.
    assert batching._batch_end([sig(4), sig(0)], 0, 4) == 2
    assert batching._batch_end([sig(1), sig(0)], 0, 1) == 1


def test_check_batchable_message() -> None:
    fixed = ModelMetadata(
        inputs=(TensorSpec("x", "float32", (2, 3)),), outputs=(TensorSpec("y", "float32", (2,)),)
    )
    batching.check_batchable(fixed, 1)
    with pytest.raises(ValueError, match="max_batch_size") as caught:
        batching.check_batchable(fixed, 4)
    assert str(caught.value) == (
        "max_batch_size = 4 needs a dynamic first dimension (-1) on every input, and input 'x' "
        "has shape [2, 3]; set max_batch_size = 1 for this model"
    )


def test_dispatcher_settings_are_checked_and_its_threads_named_and_daemonic() -> None:
    async def main() -> None:
        for kwargs, message in (
            ({"max_batch_size": 0}, "max_batch_size must be at least 1"),
            ({"threads": 0}, "threads must be at least 1"),
        ):
            with pytest.raises(ValueError, match="at least 1") as caught:
                batching.Dispatcher("m", Doubler(), **kwargs)  # type: ignore[arg-type]
            assert str(caught.value) == message
        dispatcher = batching.Dispatcher("named", Doubler(), threads=2)
        workers = [t for t in threading.enumerate() if t.name.startswith("multiserve-named-")]
        assert sorted(t.name for t in workers) == ["multiserve-named-0", "multiserve-named-1"]
        assert all(t.daemon for t in workers)  # a stuck model never keeps the process alive
        dispatcher.close()
        with pytest.raises(RuntimeError) as closed:
            dispatcher.submit(job([[1.0]]), lambda: None)
        assert str(closed.value) == "dispatcher of named is closed"
        dispatcher.join(5)

    asyncio.run(main())


def test_a_dispatcher_can_be_made_outside_its_loop() -> None:
    loop = asyncio.new_event_loop()
    try:
        dispatcher = batching.Dispatcher("m", Doubler(), loop=loop)

        async def ask() -> object:
            return await dispatcher.submit(job([[2.0]]), lambda: None)

        assert loop.run_until_complete(ask()) == [[4.0]]
        dispatcher.close()
        dispatcher.join(5)
    finally:
        loop.close()


def test_join_gives_up_after_its_timeout() -> None:
    async def main() -> None:
        gate = threading.Event()
        model = Doubler(gate)
        dispatcher = batching.Dispatcher("m", model)
        dispatcher.submit(job([[1.0]]), lambda: None)
        await until(model.entered.is_set, "the worker to be held")
        dispatcher.close()
        dispatcher.join(0.01)  # the worker is held: join returns anyway
        gate.set()
        dispatcher.join(5)

    asyncio.run(main())


def test_default_is_one_call_per_job_and_two_rows_already_batch() -> None:
    async def main(batch: int | None = None) -> list[int]:
        gate = threading.Event()
        model = Doubler(gate)
        dispatcher = (
            batching.Dispatcher("m", model)  # the default
            if batch is None
            else batching.Dispatcher("m", model, max_batch_size=batch)
        )
        blocker = dispatcher.submit(job([[0.0]]), lambda: None)
        await until(model.entered.is_set, "the worker to be held")
        futures = [dispatcher.submit(job([[float(i)]]), lambda: None) for i in range(2)]
        gate.set()
        await blocker
        assert await asyncio.gather(*futures) == [[[0.0]], [[2.0]]]
        dispatcher.close()
        return model.calls[1:]

    assert asyncio.run(main()) == [1, 1]
    assert asyncio.run(main(2)) == [2]


def test_a_worker_takes_at_most_max_jobs_per_wake_up() -> None:
    bodies = [[[float(i)]] for i in range(batching.MAX_JOBS + 8)]
    results, _, model = queued_while_blocked(64, bodies)
    assert results == [[[2.0 * i]] for i in range(len(bodies))]
    assert model.calls == [batching.MAX_JOBS, 8]


@pytest.mark.parametrize("max_batch_size", [1, 4])
def test_jobs_after_a_cancelled_or_failing_one_still_run(max_batch_size: int) -> None:
    def bad_prepare() -> tuple[batching.Inputs, batching.Finish[object]]:
        raise ValueError("cannot decode")

    async def main() -> tuple[list[object], int]:
        gate = threading.Event()
        model = Doubler(gate)
        dispatcher = batching.Dispatcher("m", model, max_batch_size=max_batch_size)
        released = 0

        def release() -> None:
            nonlocal released
            released += 1

        blocker = dispatcher.submit(job([[0.0]]), release)
        await until(model.entered.is_set, "the worker to be held")
        doomed = dispatcher.submit(job([[5.0]]), release)
        failing: asyncio.Future[object] = dispatcher.submit(bad_prepare, release)
        after = dispatcher.submit(job([[3.0]]), release)
        doomed.cancel()
        gate.set()
        await blocker
        results = await asyncio.wait_for(asyncio.gather(failing, after, return_exceptions=True), 5)
        await until(lambda: released == 4, "every release")
        dispatcher.close()
        return list(results), released

    (failed, answer), released = asyncio.run(main())
    assert isinstance(failed, ValueError)
    assert answer == [[6.0]]
    assert released == 4


@pytest.mark.parametrize(("max_batch_size", "behind"), [(1, True), (4, True), (1, False)])
def test_a_finished_answer_is_handed_back_before_a_slow_one_behind_it(
    max_batch_size: int, behind: bool
) -> None:
    """Answers go back about every FLUSH_S of work: the first job's client does not wait for
    a slow job the worker took with it, and later jobs still run."""

    async def main() -> None:
        first_done = threading.Event()
        release_slow = threading.Event()
        held = threading.Event()

        def model(inputs: Mapping[str, Array]) -> dict[str, Array]:
            x = inputs["x"]
            if x[0, 0] == 0:  # the blocker
                held.set()
                release_slow.wait(5)
            elif x[0, 0] == 1:
                time.sleep(0.005)  # longer than FLUSH_S: a hand-back is due after it
            elif x[0, 0] == 2:
                first_done.wait(5)  # the slow one: waits until the first answer is back
            return {"y": x * 2}

        dispatcher = batching.Dispatcher("m", model, max_batch_size=max_batch_size)
        blocker = dispatcher.submit(job([[0.0]]), lambda: None)
        await until(held.is_set, "the worker to be held")
        # Different widths: with batching on, each still runs in its own call.
        first = dispatcher.submit(job([[1.0]]), lambda: None)
        slow = dispatcher.submit(job([[2.0, 2.0]]), lambda: None)
        # With a job behind the slow one, or with the slow one last in the worker's batch.
        last = dispatcher.submit(job([[3.0]]), lambda: None) if behind else None
        release_slow.set()
        await blocker
        assert await asyncio.wait_for(first, 5) == [[2.0]]
        first_done.set()
        assert await asyncio.wait_for(slow, 5) == [[4.0, 4.0]]
        if last is not None:
            assert await asyncio.wait_for(last, 5) == [[6.0]]
        dispatcher.close()

    asyncio.run(main())


def test_outputs_checks_of_a_batched_call(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def per_row_sum(inputs: Mapping[str, Array]) -> dict[str, Array]:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"].sum(axis=1)}  # one value per row: 1-D, and right

    def summed(inputs: Mapping[str, Array]) -> dict[str, Array]:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"].sum(axis=0)}  # not per row

    async def run(predict: batching.Predict, bodies: list[list[list[float]]]) -> list[object]:
        gate = threading.Event()
        entered = threading.Event()

        def gated(inputs: Mapping[str, Array]) -> dict[str, Array]:
            if not entered.is_set():
                entered.set()
                gate.wait(5)
                return {"y": np.zeros(len(inputs["x"]), np.float32)}
            return predict(inputs)

        dispatcher = batching.Dispatcher("m", gated, max_batch_size=8)
        blocker = dispatcher.submit(job_1d([[0.0]]), lambda: None)
        await until(entered.is_set, "the worker to be held")
        futures = [dispatcher.submit(job_1d(body), lambda: None) for body in bodies]
        gate.set()
        await blocker
        results: list[object] = list(await asyncio.gather(*futures))
        dispatcher.close()
        return results

    assert asyncio.run(run(per_row_sum, [[[1.0, 2.0]], [[3.0, 4.0]]])) == [[3.0], [7.0]]
    assert calls == [2]  # one call, its 1-D outputs accepted
    calls.clear()
    with caplog.at_level(logging.WARNING, "multiserve.batching"):
        assert asyncio.run(run(summed, [[[1.0], [2.0]], [[3.0], [4.0]]])) == [[3.0], [7.0]]
    assert calls == [4, 2, 2]
    assert caplog.messages == [
        "m: a batched call of 4 rows returned outputs of another length; "
        "running requests one by one"
    ]
    calls.clear()
    # A job alone is called once, even when its outputs would not split.
    assert asyncio.run(run(summed, [[[1.0], [2.0]]])) == [[3.0]]
    assert calls == [2]


def job_1d(values: list[list[float]]) -> batching.Prepare[list[float]]:
    def prepare() -> tuple[batching.Inputs, batching.Finish[list[float]]]:
        def finish(outputs: batching.Outputs) -> list[float]:
            result: list[float] = np.atleast_1d(outputs["y"]).tolist()
            return result

        return {"x": np.array(values, dtype=np.float32)}, finish

    return prepare


def test_a_failing_release_is_logged_and_the_answer_still_given(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def release() -> None:
        raise RuntimeError("release failed")

    async def main() -> object:
        dispatcher = batching.Dispatcher("m", Doubler())
        answer = await dispatcher.submit(job([[1.0]]), release)
        dispatcher.close()
        return answer

    with caplog.at_level(logging.ERROR, "multiserve.batching"):
        assert asyncio.run(main()) == [[2.0]]
    assert caplog.messages == ["releasing a finished job failed"]
