"""``.npy`` bodies without `np.load` and `np.save` on the hot path.

Both parse or write the header with the `ast` module on every call (about 100 µs and 35 µs
here), which dwarfs a small model's inference. Headers as numpy writes them (sorted keys,
C order, a plain dtype) are read with a regular expression and remembered; the array is a
view of the body, as `np.load` returns for an in-memory file. Anything else (Fortran order,
structured or object dtypes, other writers' spellings) goes to `np.load`, once numpy's own
header reader has said what the header declares and the body holds exactly that many bytes: a
header declaring ``(10**9, 16)`` over a 64-byte body is refused, never allocated. Writing
remembers the header numpy writes for each dtype and shape, so the bytes are exactly
`np.save`'s.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache

import numpy as np

from multiserve.types import Array

_MAGIC = b"\x93NUMPY"
_HEADER = re.compile(
    rb"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \}"
    rb" *\n"
)
# Distinct headers remembered: one per dtype and shape a client sends.
_CACHED = 256


def load(body: bytes) -> Array:
    """The array in an ``.npy`` body, as `np.load(allow_pickle=False)` reads it; ValueError,
    OSError or EOFError for a body that is not one."""
    parsed = _parse(body)
    if parsed is None:
        return _np_load(body)
    dtype, shape, count, offset = parsed
    if len(body) - offset != count * dtype.itemsize:
        return _np_load(body)  # truncated or trailing bytes: refused there
    return np.frombuffer(body, dtype, count, offset).reshape(shape)


def save(array: Array) -> bytes:
    """``array`` as an ``.npy`` file, byte for byte what `np.save(allow_pickle=False)` writes."""
    header = None
    if array.flags.c_contiguous and not array.dtype.hasobject and array.dtype.names is None:
        header = _header(array.dtype, array.shape)
    if header is None:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        return buffer.getvalue()
    return header + array.tobytes()


def _np_load(body: bytes) -> Array:
    if body[:6] == _MAGIC:
        _check_declared(body)
    array = np.load(io.BytesIO(body), allow_pickle=False)
    if not isinstance(array, np.ndarray):  # an .npz archive
        array.close()
        raise ValueError("an .npz archive, not a single array")
    return array


def _check_declared(body: bytes) -> None:
    """ValueError unless the body holds the bytes its header declares (numpy would allocate the
    declared array before finding out; trailing bytes it ignores, and so does this)."""
    stream = io.BytesIO(body)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    if dtype.hasobject:
        raise ValueError("object arrays are not accepted")
    count = 1
    for dim in shape:
        count *= dim
    need, have = count * dtype.itemsize, len(body) - stream.tell()
    if need > have:
        raise ValueError(
            f"the header declares shape {shape} of {dtype} ({need} bytes) but {have} bytes follow"
        )


def _parse(body: bytes) -> tuple[np.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, element count, data offset) for a plain header numpy wrote, else None."""
    if body[:6] != _MAGIC or len(body) < 10:
        return None
    major = body[6]
    if major == 1:
        start = 10
    elif major in (2, 3):
        start = 12
    else:
        return None
    end = start + int.from_bytes(body[8:start], "little")
    if end > len(body):
        return None
    found = _read_header(body[start:end])
    if found is None:
        return None
    dtype, shape, count = found
    return dtype, shape, count, end


@lru_cache(maxsize=_CACHED)
def _read_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    match = _HEADER.fullmatch(header)
    if match is None:
        return None
    try:
        dtype = np.dtype(match.group(1).decode("ascii"))
    except TypeError:
        return None
    if dtype.hasobject or dtype.names is not None or dtype.itemsize == 0:
        return None
    dims = match.group(2)
    shape = tuple(int(dim) for dim in dims.split(b",") if dim.strip())
    count = 1
    for dim in shape:
        count *= dim
    return dtype, shape, count


@lru_cache(maxsize=_CACHED)
def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes | None:
    """The header `np.save` writes for a C-ordered array (format 1.0, or None where the
    header needs a later format: numpy's own writer then picks it)."""
    fields = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    buffer = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buffer, fields)
    except ValueError:
        return None
    return buffer.getvalue()
