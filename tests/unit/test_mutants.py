"""Rules of the pure modules that the behavioural unit tests left unstated, each found by a
mutant that survived them (`make mutation`): exact boundaries, which error a request gets and
what its message says (messages are part of the interface: clients and operators read them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from multiserve import codecs, npy, policy
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
from multiserve.types import ModelMetadata, TensorSpec


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
    with pytest.raises(InvalidInput) as caught:
        codecs.check_inputs({"a": [1], "b": [1]}, TWO)
    assert caught.value.message == "input 'b': expected string values, got integers"


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
