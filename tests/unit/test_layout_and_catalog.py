from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from multiserve.catalog import Catalog, VersionRecord
from multiserve.errors import ModelNotFound, VersionNotFound
from multiserve.repository.layout import is_valid_name, merge_config, parse_version


@pytest.mark.parametrize("name", ["iris", "resnet-50", "a", "A.b_c-d", "9lives", "x" * 128])
def test_valid_names(name: str) -> None:
    assert is_valid_name(name)


@pytest.mark.parametrize(
    "name", ["", ".hidden", "-dash", "_under", "has space", "x" * 129, "ü", "a/b"]
)
def test_invalid_names(name: str) -> None:
    assert not is_valid_name(name)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("1", 1),
        ("42", 42),
        ("0", None),
        ("007", None),
        ("-1", None),
        ("1.0", None),
        ("v1", None),
        ("", None),
    ],
)
def test_parse_version(text: str, version: int | None) -> None:
    assert parse_version(text) == version


@given(st.integers(min_value=1, max_value=10**17))
def test_every_positive_integer_round_trips(number: int) -> None:
    assert parse_version(str(number)) == number


def test_version_config_wins_key_by_key() -> None:
    model = {"device": "cpu", "onnx": {"a": 1, "b": 2}, "inputs": [1]}
    version = {"device": "cuda", "onnx": {"b": 3}}
    assert merge_config(model, version) == {
        "device": "cuda",
        "onnx": {"a": 1, "b": 3},
        "inputs": [1],
    }
    assert model == {"device": "cpu", "onnx": {"a": 1, "b": 2}, "inputs": [1]}


def record(name: str, version: int) -> VersionRecord:
    return VersionRecord(name, version, Path(name) / str(version), "onnx", "model.onnx")


def test_catalog_resolves_numbers_and_latest() -> None:
    catalog = Catalog.from_records(
        [record("m", 3), record("m", 10), record("m", 2), record("n", 1)]
    )
    assert list(catalog.models) == ["m", "n"]
    assert [r.version for r in catalog.candidates("m", "latest")] == [10, 3, 2]
    assert [r.version for r in catalog.candidates("m", "3")] == [3]
    with pytest.raises(VersionNotFound, match="versions: 2, 3, 10"):
        catalog.candidates("m", "4")
    with pytest.raises(VersionNotFound):
        catalog.candidates("m", "03")
    with pytest.raises(ModelNotFound):
        catalog.candidates("x", "latest")


def test_catalog_is_immutable() -> None:
    catalog = Catalog.from_records([record("m", 1)])
    with pytest.raises(TypeError):
        catalog.models["n"] = catalog.models["m"]  # type: ignore[index]
    with pytest.raises(TypeError):
        catalog.models["m"].versions[2] = record("m", 2)  # type: ignore[index]
