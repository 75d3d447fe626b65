from __future__ import annotations

import contextlib
import io

import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from multiserve import codecs
from multiserve.errors import InvalidInput, MalformedRequest, NotAcceptable
from multiserve.types import ModelMetadata, TensorSpec

FLOAT = ModelMetadata((TensorSpec("x", "float32", (-1, 3)),), (TensorSpec("y", "float32", (-1,)),))
UINT8 = ModelMetadata((TensorSpec("ids", "uint8", (-1,)),), (TensorSpec("y", "uint8", (-1,)),))
TEXT = ModelMetadata((TensorSpec("s", "string", (-1,)),), (TensorSpec("y", "int64", (-1,)),))
SCALAR = ModelMetadata((TensorSpec("t", "float64", ()),), (TensorSpec("y", "float64", ()),))


def test_named_and_bare_inputs_decode_to_the_declared_dtype() -> None:
    for body in (b'{"inputs": [[1, 2, 3]]}', b'{"inputs": {"x": [[1, 2.5, 3]]}}'):
        (x,) = codecs.decode_json(body, FLOAT).values()
        assert x.dtype == np.float32
        assert x.shape == (1, 3)


def test_integer_ranges_are_checked() -> None:
    assert codecs.decode_json(b'{"inputs": [0, 255]}', UINT8)["ids"].tolist() == [0, 255]
    with pytest.raises(InvalidInput, match=r"out of range for uint8 \[0, 255\]"):
        codecs.decode_json(b'{"inputs": [256]}', UINT8)
    with pytest.raises(InvalidInput, match="out of range"):
        codecs.decode_json(b'{"inputs": [-1]}', UINT8)


def test_strings_and_scalars() -> None:
    assert codecs.decode_json(b'{"inputs": ["a", "b"]}', TEXT)["s"].tolist() == ["a", "b"]
    with pytest.raises(InvalidInput, match="expected string values, got integers"):
        codecs.decode_json(b'{"inputs": [1]}', TEXT)
    assert codecs.decode_json(b'{"inputs": 2.5}', SCALAR)["t"].shape == ()


def test_bools_are_not_floats_in_disguise_but_may_become_floats() -> None:
    x = codecs.decode_json(b'{"inputs": [[true, false, true]]}', FLOAT)["x"]
    assert x.tolist() == [[1.0, 0.0, 1.0]]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"", MalformedRequest),
        (b"\xff\xfe", MalformedRequest),
        (b'"inputs"', MalformedRequest),
        (b'{"inputs": {"x": [[1, 2, 3]], "z": 1}}', InvalidInput),
        (b'{"inputs": [[[1, 2, 3]]]}', InvalidInput),
        (b'{"inputs": [[1, 2, 3, 4]]}', InvalidInput),
        (b'{"inputs": [[1, 2, {"a": 1}]]}', InvalidInput),
        (b'{"inputs": [[1, 2, "3"]]}', InvalidInput),
    ],
)
def test_bad_bodies(body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        codecs.decode_json(body, FLOAT)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_a_client_error(body: bytes) -> None:
    for decode in (codecs.decode_json, codecs.decode_npy):
        with contextlib.suppress(InvalidInput, MalformedRequest):
            decode(body, FLOAT)


@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=3),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_json_never_raises_anything_but_a_client_error(value: object) -> None:
    try:
        body = orjson.dumps({"inputs": value})
    except (orjson.JSONEncodeError, TypeError):
        return
    with contextlib.suppress(InvalidInput, MalformedRequest):
        codecs.decode_json(body, FLOAT)


@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=5).map(lambda s: (s[0], 3)),
    )
)
def test_npy_round_trip(array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    decoded = codecs.decode_npy(buffer.getvalue(), FLOAT)["x"]
    np.testing.assert_array_equal(decoded, array)
    encoded = codecs.encode_npy({"y": array}, None)
    np.testing.assert_array_equal(np.load(io.BytesIO(encoded)), array)


def test_json_encoding_of_outputs() -> None:
    outputs = {
        "f": np.array([[1.5, 2.0]], np.float32),
        "strided": np.arange(6, dtype=np.float64).reshape(2, 3)[:, ::2],
        "s": np.array(["a", "b"]),
        "o": np.array(["x"], dtype=object),
        "b": np.array([True]),
        "scalar": np.float64(3.0),
    }
    decoded = orjson.loads(codecs.encode_json("m", 7, outputs))  # type: ignore[arg-type]
    assert decoded == {
        "model_name": "m",
        "model_version": "7",
        "outputs": {
            "f": [[1.5, 2.0]],
            "strided": [[0.0, 2.0], [3.0, 5.0]],
            "s": ["a", "b"],
            "o": ["x"],
            "b": [True],
            "scalar": 3.0,
        },
    }


def test_npy_response_needs_one_output() -> None:
    with pytest.raises(NotAcceptable):
        codecs.encode_npy({"a": np.zeros(1), "b": np.zeros(1)}, None)
