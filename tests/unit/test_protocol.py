"""The transport-free Open Inference Protocol pieces both faces use."""

from __future__ import annotations

import numpy as np
import pytest

from multiserve import protocol
from multiserve.errors import InvalidInput
from multiserve.lifecycle import VersionState


def test_every_version_state_has_a_repository_state() -> None:
    # A downloading version once had none: the index answered 500 while a bucket model loaded.
    assert set(protocol._REPOSITORY_STATES) == set(VersionState)


@pytest.mark.parametrize(
    ("datatype", "array"),
    [
        ("FP32", np.array([[1.5, -2.0]], np.float32)),
        ("FP16", np.array([0.5, 65504.0], np.float16)),
        ("INT64", np.array([-(2**63), 2**63 - 1], np.int64)),
        ("BOOL", np.array([True, False, True])),
        ("BYTES", np.array(["a", "", "héllo"], np.str_)),
    ],
)
def test_binary_tensors_round_trip(datatype: str, array: np.ndarray) -> None:
    assert protocol.datatype_of(array) == datatype
    chunk = protocol.to_binary(array, datatype)
    decoded = protocol.from_binary(chunk, datatype, array.size, "t")
    np.testing.assert_array_equal(decoded.reshape(array.shape), array)


def test_binary_tensors_that_lie_about_their_size_are_refused() -> None:
    with pytest.raises(InvalidInput, match="8 bytes of binary data do not hold 4 FP32"):
        protocol.from_binary(b"\x00" * 8, "FP32", 4, "t")
    with pytest.raises(InvalidInput, match="truncated BYTES element"):
        protocol.from_binary(b"\x09\x00\x00\x00abc", "BYTES", 1, "t")
