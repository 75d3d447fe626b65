"""The hot path's .npy reader and writer agree with numpy's, byte for byte and error for error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from multiserve import npy

DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="="),
    hnp.integer_dtypes(endianness=">"),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(endianness="<"),
    hnp.floating_dtypes(endianness=">"),
    hnp.complex_number_dtypes(),
    hnp.unicode_string_dtypes(max_len=4),
)
ARRAYS = hnp.arrays(DTYPES, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))


def np_save(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def np_load(body: bytes) -> np.ndarray:
    array: np.ndarray = np.load(io.BytesIO(body), allow_pickle=False)
    return array


def same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@given(ARRAYS, st.booleans())
def test_writes_what_numpy_writes_and_reads_it_back(array: np.ndarray, fortran: bool) -> None:
    if fortran:
        array = np.asfortranarray(array)
    written = npy.save(array)
    assert written == np_save(array)
    same(npy.load(written), np_load(written))


@given(ARRAYS)
def test_reads_format_2_and_transposed_views(array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=(2, 0))
    same(npy.load(buffer.getvalue()), array)
    view = array.T
    same(npy.load(npy.save(view)), view)


def test_a_known_header_is_parsed_once_and_the_data_is_not_copied() -> None:
    body = np_save(np.arange(8, dtype=np.float32).reshape(2, 4))
    array = npy.load(body)
    assert array.base is not None  # a view of the body
    assert npy._parse(body) is not None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x93NUMPY",
        b"not an npy file at all",
        np_save(np.arange(4, dtype=np.int32))[:-1],  # truncated data
        np_save(np.arange(4, dtype=np.int32))[:20],  # truncated header
        np_save(np.arange(4, dtype=np.int32)).replace(b"'<i4'", b"'|O8'"),  # object dtype
        np_save(np.arange(4, dtype=np.int32)).replace(b"'<i4'", b"'<x4'"),  # no such dtype
        np_save(np.arange(4, dtype=np.int32)).replace(b"(4,)", b"(4,2,)"),  # data too short
    ],
)
def test_bad_bodies_fail_as_numpy_fails(body: bytes) -> None:
    with pytest.raises((ValueError, OSError, EOFError)) as expected:
        np_load(body)
    with pytest.raises(type(expected.value)):
        npy.load(body)


def test_trailing_bytes_are_ignored_as_numpy_ignores_them() -> None:
    body = np_save(np.arange(4, dtype=np.int32)) + b"junk"
    same(npy.load(body), np_load(body))


def test_an_npz_archive_is_refused() -> None:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.arange(3))
    with pytest.raises(ValueError, match="npz"):
        npy.load(buffer.getvalue())


def _npy_with_header(header: str, body: bytes, version: tuple[int, int] = (1, 0)) -> bytes:
    """An .npy file whose header says ``header`` (padded as numpy pads it) over ``body``."""
    text = header.encode("latin1")
    length_bytes = 2 if version == (1, 0) else 4
    pad = -(6 + 2 + length_bytes + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    size = len(text).to_bytes(length_bytes, "little")
    return b"\x93NUMPY" + bytes(version) + size + text + body


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_a_header_declaring_more_than_the_body_holds_is_refused_before_numpy_allocates(
    version: tuple[int, int],
) -> None:
    # Fortran order sends it down numpy's path; (10**9, 16) float32 would be 60 GiB.
    header = "{'descr': '<f4', 'fortran_order': True, 'shape': (1000000000, 16), }"
    with pytest.raises(ValueError, match="declares") as caught:
        npy.load(_npy_with_header(header, b"\x00" * 64, version))
    assert str(caught.value) == (
        "the header declares shape (1000000000, 16) of float32 (64000000000 bytes) but 64 "
        "bytes follow"
    )
    # Exactly enough bytes is accepted, with numpy's answer.
    exact = "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }"
    body = np.arange(4, dtype=np.float32).tobytes()
    assert npy.load(_npy_with_header(exact, body, version)).tolist() == [[0.0, 2.0], [1.0, 3.0]]
    assert npy.load(_npy_with_header(exact, body + b"\x00" * 4, version)).shape == (2, 2)
    with pytest.raises(ValueError, match=r"\(2, 2\) of float32 \(16 bytes\) but 15 bytes"):
        npy.load(_npy_with_header(exact, body[:-1], version))


def test_other_formats_and_object_arrays_are_refused_by_the_declared_size_check() -> None:
    header = "{'descr': '<f4', 'fortran_order': True, 'shape': (1,), }"
    with pytest.raises(ValueError, match="format") as caught:
        npy.load(_npy_with_header(header, b"\x00" * 4, (3, 0)))
    assert str(caught.value) == ".npy format 3.0 is not supported (1.0 or 2.0)"
    objects = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    with pytest.raises(ValueError, match="object") as caught:
        npy.load(_npy_with_header(objects, b"\x00" * 8))
    assert str(caught.value) == "object arrays are not accepted"
    # A shape with a zero needs no bytes at all.
    empty = "{'descr': '<f4', 'fortran_order': True, 'shape': (0, 5), }"
    assert npy.load(_npy_with_header(empty, b"")).shape == (0, 5)
