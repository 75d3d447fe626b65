"""The gRPC face's pieces that need no server: error statuses and typed tensor contents."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from multiserve import errors
from multiserve.grpc.infer import _from_contents, _to_contents
from multiserve.grpc.status import code_of, trailers_of

EXPECTED = {
    errors.MalformedRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthorized: grpc.StatusCode.UNAUTHENTICATED,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.VersionNotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PayloadTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ModelTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PredictionFailed: grpc.StatusCode.INTERNAL,
    errors.StateNotSaved: grpc.StatusCode.INTERNAL,
    errors.ModelLoadFailed: grpc.StatusCode.UNAVAILABLE,
    errors.DownloadFailed: grpc.StatusCode.UNAVAILABLE,
    errors.VersionSettling: grpc.StatusCode.UNAVAILABLE,
    errors.CacheThrashing: grpc.StatusCode.UNAVAILABLE,
    errors.NotReady: grpc.StatusCode.UNAVAILABLE,
}


def _error_classes() -> list[type[errors.MultiserveError]]:
    found = []
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.MultiserveError):
            found.append(value)
    return found


@pytest.mark.parametrize("error", _error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_has_a_status_code(error: type[errors.MultiserveError]) -> None:
    code = code_of(error("message"))
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)
    if error in EXPECTED:
        assert code == EXPECTED[error]


def test_retry_hints_follow_retry_after() -> None:
    assert trailers_of(errors.VersionSettling("settling")) == (
        ("retry-after", "1"),
        ("grpc-retry-pushback-ms", "1000"),
    )
    assert trailers_of(errors.CacheThrashing("thrashing"))
    assert trailers_of(errors.ModelLoadFailed("broken")) == ()


def test_typed_contents_round_trip_every_typed_datatype() -> None:
    cases = [
        ("BOOL", np.array([True, False])),
        ("INT8", np.array([-128, 127], np.int8)),
        ("UINT16", np.array([0, 65535], np.uint16)),
        ("INT64", np.array([-(2**62), 2**62], np.int64)),
        ("UINT64", np.array([0, 2**63], np.uint64)),
        ("FP32", np.array([0.5, -1.25], np.float32)),
        ("FP64", np.array([1e300, -0.0], np.float64)),
        ("BYTES", np.array(["héllo", ""], np.str_)),
    ]
    for datatype, array in cases:
        contents = pb.InferTensorContents()
        _to_contents(contents, array, datatype)
        decoded = _from_contents(contents, datatype, array.size, "t")
        assert decoded.dtype == array.dtype, datatype
        np.testing.assert_array_equal(decoded, array)


def test_typed_contents_are_checked() -> None:
    contents = pb.InferTensorContents(int_contents=[300])
    with pytest.raises(errors.InvalidInput, match="out of range for INT8"):
        _from_contents(contents, "INT8", 1, "t")
    with pytest.raises(errors.InvalidInput, match="2 values do not fill shape of 3"):
        _from_contents(pb.InferTensorContents(fp32_contents=[1, 2]), "FP32", 3, "t")
    with pytest.raises(errors.InvalidInput, match="FP16 has no typed contents"):
        _from_contents(pb.InferTensorContents(), "FP16", 0, "t")
