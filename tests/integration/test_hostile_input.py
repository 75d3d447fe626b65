# ruff: noqa: E501  (the tables of cases read best one case a line)
"""Every bad input is a 4xx with a JSON body, never a 500 (issue 12): a table of hostile
requests swept over every decoder (native JSON, .npy, V2 JSON, V2 binary, admin bodies, the
headers that carry sizes and timeouts), the same cases over gRPC where protocol.py decodes them,
and the process-wide bound on bytes being received."""

from __future__ import annotations

import io
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.conftest import ADMIN_TOKEN, RunningServer, StartServer

NPY = "application/x-npy"
JSON = "application/json"
AUTH = f"Bearer {ADMIN_TOKEN}"


def raw_request(
    url: str,
    method: str,
    path: str,
    headers: dict[str, bytes],
    body: bytes = b"",
    sent: int | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte (headers no client library would send), answered
    on a connection closed after it: (status, headers, body). ``sent``: send only that much
    of the body (for a request refused before its body is read: the server closes the
    connection then, and a client still sending would get a reset instead of the answer)."""
    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: " + host.encode()]
    if "content-length" not in headers:
        headers = {**headers, "content-length": str(len(body)).encode()}
    lines += [name.encode() + b": " + value for name, value in headers.items()]
    lines.append(b"connection: close")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body[:sent])
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, content = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    answer_headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        answer_headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), answer_headers, content


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(header: str, version: int = 1, data: bytes = b"\0" * 64) -> bytes:
    """An .npy file whose header says what a client chose, over ``data``."""
    encoded = header.encode("latin-1")
    if version == 1:
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(encoded)) + encoded + data
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<I", len(encoded)) + encoded + data


def v2_request(inputs: list[dict[str, Any]], binary: bytes = b"") -> tuple[bytes, int]:
    header = orjson.dumps({"inputs": inputs})
    return header + binary, len(header)


def binary(inputs: list[dict[str, Any]], tail: bytes) -> tuple[bytes, dict[str, bytes]]:
    """A V2 binary request: the JSON header, then ``tail`` as its tensors' bytes."""
    body, length = v2_request(inputs)
    return body + tail, {"inference-header-content-length": str(length).encode()}


BINARY = "application/octet-stream"
ONES = [1.0, 1.0, 1.0, 1.0]
HUGE = {"descr": "<f4", "fortran_order": False}

# (name, path, content type, body, extra headers, status): every one of them a JSON 4xx.
NATIVE = "/models/mlp/2/predict"
V2 = "/v2/models/mlp/versions/2/infer"
CASES: list[tuple[str, str, str, bytes, dict[str, bytes], int]] = [
    # native JSON
    ("json truncated", NATIVE, JSON, b'{"inputs": [[1, 2, 3, 4]]', {}, 400),
    ("json nested 100000 deep", NATIVE, JSON, b"[" * 100_000, {}, 400),
    ("json inputs a string", NATIVE, JSON, b'{"inputs": "abcd"}', {}, 400),
    ("json inputs an object of objects", NATIVE, JSON, b'{"inputs": {"x": {"a": 1}}}', {}, 400),
    ("json huge integers", NATIVE, JSON, b'{"inputs": [[1e400, 2, 3, 4]]}', {}, 400),
    ("json not utf-8", NATIVE, JSON, b'{"inputs": "\xff\xfe"}', {}, 400),
    ("json empty", NATIVE, JSON, b"", {}, 400),
    # the headers that carry sizes and timeouts
    ("timeout not a number", NATIVE, JSON, b"{}", {"x-request-timeout": b"soon"}, 400),
    ("timeout superscript two", NATIVE, JSON, b"{}", {"x-request-timeout": b"\xb2"}, 400),
    ("timeout negative", NATIVE, JSON, b"{}", {"x-request-timeout": b"-1"}, 400),
    ("timeout nan", NATIVE, JSON, b"{}", {"x-request-timeout": b"nan"}, 400),
    ("text/plain to a tensor model", NATIVE, "text/plain", b"hello", {}, 415),
    ("text/plain with a timeout", NATIVE, "text/plain", b"hello", {"x-request-timeout": b"2"}, 415),
    ("text/plain with a bad timeout", NATIVE, "text/plain", b"hello", {"x-request-timeout": b"\xb2"}, 415),
    # .npy
    ("npy (10**9, 16) over 64 bytes", NATIVE, NPY, npy_header(str({**HUGE, "shape": (10**9, 16)})), {}, 400),
    ("npy (2**63,)", NATIVE, NPY, npy_header(str({**HUGE, "shape": (2**63,)})), {}, 400),
    ("npy (2**40, 2**40) v2", NATIVE, NPY, npy_header(str({**HUGE, "shape": (2**40, 2**40)}), 2), {}, 400),
    ("npy fortran huge", NATIVE, NPY, npy_header(str({**HUGE, "fortran_order": True, "shape": (10**9, 4)})), {}, 400),
    ("npy object dtype", NATIVE, NPY, npy_header(str({"descr": "|O", "fortran_order": False, "shape": (1, 4)})), {}, 400),
    ("npy format 3", NATIVE, NPY, npy_header(str({**HUGE, "shape": (1, 4)}), 3), {}, 400),
    ("npy header garbage", NATIVE, NPY, npy_header("{'descr': __import__('os')}"), {}, 400),
    ("npy header not a dict", NATIVE, NPY, npy_header("[1, 2, 3]"), {}, 400),
    ("npy truncated", NATIVE, NPY, npy_bytes(np.ones((2, 4), np.float32))[:-3], {}, 400),
    ("npy magic only", NATIVE, NPY, b"\x93NUMPY", {}, 400),
    ("npy not npy", NATIVE, NPY, b"hello there", {}, 400),
    ("npy strings", NATIVE, NPY, npy_bytes(np.array([["a", "b", "c", "d"]])), {}, 400),
    # V2 JSON
    ("v2 not json", V2, JSON, b"{nope", {}, 400),
    ("v2 inputs not a list", V2, JSON, b'{"inputs": {}}', {}, 400),
    ("v2 shape [2**32, 2**32]", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [2**32, 2**32], "data": ONES}])[0], {}, 400),
    ("v2 shape [0, 2**63]", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [0, 2**63], "data": []}])[0], {}, 400),
    ("v2 shape [0, 2**62]", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [0, 2**62], "data": []}])[0], {}, 400),
    ("v2 shape of 40 dims", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [1] * 40, "data": [1.0]}])[0], {}, 400),
    ("v2 shape floats", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [1.5, 4], "data": ONES}])[0], {}, 400),
    ("v2 shape a string", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": "1,4", "data": ONES}])[0], {}, 400),
    ("v2 datatype unknown", V2, JSON, v2_request([{"name": "x", "datatype": "FP99", "shape": [1, 4], "data": ONES}])[0], {}, 400),
    ("v2 data a string", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": "abcd"}])[0], {}, 400),
    ("v2 data ragged", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1], [1, 2]]}])[0], {}, 400),
    ("v2 parameters a list", V2, JSON, v2_request([{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": ONES, "parameters": [1]}])[0], {}, 400),
    # V2 binary
    ("v2 header length 5000 digits", V2, BINARY, b"{}", {"inference-header-content-length": b"9" * 5000}, 400),
    ("v2 header length superscript two", V2, BINARY, b"{}", {"inference-header-content-length": b"\xb2"}, 400),
    ("v2 header length negative", V2, BINARY, b"{}", {"inference-header-content-length": b"-2"}, 400),
    ("v2 header length empty", V2, BINARY, b"{}", {"inference-header-content-length": b""}, 400),
    ("v2 header length past the body", V2, BINARY, b"{}", {"inference-header-content-length": b"999"}, 400),
    ("v2 binary size past the end", V2, BINARY, *binary([{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}], b"\0" * 8), 400),
    ("v2 binary size negative", V2, BINARY, *binary([{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": -16}}], b""), 400),
    ("v2 binary shape [2**32, 2**32]", V2, BINARY, *binary([{"name": "x", "datatype": "FP32", "shape": [2**32, 2**32], "parameters": {"binary_data_size": 16}}], b"\0" * 16), 400),
    ("v2 binary leftover bytes", V2, BINARY, *binary([{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {"binary_data_size": 16}}], b"\0" * 20), 400),
    ("v2 bytes truncated element", V2, BINARY, *binary([{"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}], b"\xff\xff\xff\x7fab"), 400),
]  # fmt: skip


@pytest.fixture(scope="module")
def shared(example_models: Path) -> Iterator[RunningServer]:
    from multiserve.backends import BackendRegistry
    from multiserve.settings import Settings

    settings = Settings.load(
        environ={},
        overrides={"models": str(example_models), "settle_window_s": 0, "admin_token": ADMIN_TOKEN},
    )
    server = RunningServer(settings, BackendRegistry()).start()
    yield server
    server.stop()


def check_json_error(
    status: int, headers: dict[str, str], body: bytes, expected: int, v2: bool
) -> None:
    assert status == expected, body
    assert headers["content-type"].startswith("application/json"), body
    assert b"Traceback" not in body
    error = orjson.loads(body)["error"]
    if v2:  # the protocol's shape
        assert isinstance(error, str)
        assert error
    else:
        assert set(error) == {"code", "message"}
        assert error["message"]


@pytest.mark.parametrize(
    ("path", "content_type", "body", "headers", "status"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_every_hostile_request_is_a_json_4xx(
    shared: RunningServer,
    path: str,
    content_type: str,
    body: bytes,
    headers: dict[str, bytes],
    status: int,
) -> None:
    answer = raw_request(
        shared.url, "POST", path, {"content-type": content_type.encode(), **headers}, body
    )
    check_json_error(*answer, status, v2=path.startswith("/v2"))
    # ... and the model still serves.
    ok = raw_request(
        shared.url,
        "POST",
        NATIVE,
        {"content-type": b"application/json"},
        b'{"inputs": [[1, 2, 3, 4]]}',
    )
    assert ok[0] == 200, ok[2]


ADMIN_CASES: list[tuple[str, str, str, bytes, int]] = [
    ("label body 200 kB", "PUT", "/admin/models/mlp/labels/stable", b'{"version": "1"}' + b" " * 200_000, 413),
    ("label body not json", "PUT", "/admin/models/mlp/labels/stable", b"{", 400),
    ("label version a list", "PUT", "/admin/models/mlp/labels/stable", b'{"version": [1]}', 400),
    ("label version huge", "PUT", "/admin/models/mlp/labels/stable", b'{"version": "' + b"9" * 5000 + b'"}', 404),
    ("label named latest", "PUT", "/admin/models/mlp/labels/latest", b'{"version": "1"}', 400),
    ("label named 7", "PUT", "/admin/models/mlp/labels/7", b'{"version": "1"}', 400),
    ("repository index 200 kB", "POST", "/v2/repository/index", b"{}" + b" " * 200_000, 413),
    ("repository index not json", "POST", "/v2/repository/index", b"[", 400),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [case[1:] for case in ADMIN_CASES],
    ids=[case[0] for case in ADMIN_CASES],
)
def test_admin_bodies_are_small_and_checked(
    shared: RunningServer, method: str, path: str, body: bytes, status: int
) -> None:
    headers = {"content-type": b"application/json", "authorization": AUTH.encode()}
    answer = raw_request(
        shared.url, method, path, headers, body, 1000 if len(body) > 65536 else None
    )
    check_json_error(*answer, status, v2=path.startswith("/v2"))


def test_chunked_admin_body_past_the_limit_is_413(shared: RunningServer) -> None:
    """No Content-Length to refuse it by: the limit holds while reading."""
    import httpx

    def chunks() -> Iterator[bytes]:
        yield b'{"version": "1"'
        for _ in range(100):
            yield b" " * 1024
        yield b"}"

    response = httpx.put(
        shared.url + "/admin/models/mlp/labels/stable",
        content=chunks(),
        headers={"authorization": AUTH},
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


GRPC_SHAPES = [[2**32, 2**32], [0, 2**63 - 1], [1] * 40, [-1, 4]]


@pytest.mark.parametrize("shape", GRPC_SHAPES, ids=[str(s)[:20] for s in GRPC_SHAPES])
@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_grpc_hostile_shapes_are_invalid_argument(
    shared: RunningServer, shape: list[int], raw: bool
) -> None:
    request = pb.ModelInferRequest(model_name="mlp", model_version="2")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=shape)
    if raw:
        request.raw_input_contents.append(b"\0" * 16)
    else:
        tensor.contents.fp32_contents.extend(ONES)
    with grpc.insecure_channel(shared.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


def test_bytes_being_received_are_bounded_across_the_process(
    start_server: StartServer, example_models: Path
) -> None:
    """Two uploads within max_request_bytes each, over max_receive_bytes together: the second
    gets 503 with Retry-After while the first is held; once it is done, the same request
    serves."""
    server = start_server(
        example_models, max_request_bytes="1MiB", max_receive_bytes="1MiB", grpc_port=0
    )
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"inputs": [[1, 2, 3, 4]]}' + b" " * 1_000_000
    # Small enough to arrive in one read: the server then answers with nothing left unread
    # (a server that closes on unread bytes resets the connection, and the answer is lost).
    small = b'{"inputs": [[1, 2, 3, 4]]}' + b" " * 60_000
    slow = socket.create_connection((host, int(port)), timeout=30)
    try:
        slow.sendall(
            b"POST /models/mlp/2/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
            + f"\r\ncontent-length: {len(body)}\r\n\r\n".encode()
            + body[:-10]
        )
        time.sleep(0.5)  # the server has read (and holds) most of the first body
        status, headers, content = raw_request(
            server.url, "POST", NATIVE, {"content-type": b"application/json"}, small
        )
        assert status == 503, content
        assert headers["retry-after"] == "1"
        assert orjson.loads(content)["error"]["code"] == "overloaded"
        slow.sendall(body[-10:])
        assert slow.recv(12).startswith(b"HTTP/1.1 200")
    finally:
        slow.close()
    time.sleep(0.2)
    status, _, content = raw_request(
        server.url, "POST", NATIVE, {"content-type": b"application/json"}, small
    )
    assert status == 200, content


@pytest.mark.parametrize("length", [b"9" * 5000, b"\xb2", b"-1"], ids=["5000 digits", "²", "-1"])
def test_content_length_that_is_no_byte_count_is_400(shared: RunningServer, length: bytes) -> None:
    """The HTTP parser refuses it before the app sees it (the app's own check,
    `declared_length`, is unit-tested): 400, never a 500."""
    status, _, _ = raw_request(
        shared.url, "POST", NATIVE, {"content-length": length, "content-type": b"application/json"}
    )
    assert status == 400
