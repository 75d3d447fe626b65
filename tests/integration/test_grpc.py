"""The Open Inference Protocol over gRPC, driven by Triton's own gRPC client (and, for typed
contents, the service stub it ships), checked against onnxruntime and against what the HTTP
face answers to the same request."""

from __future__ import annotations

import functools
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.grpc as tg
from starlette.applications import Starlette
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from examples.make_models import scaled_onnx_bytes
from multiserve.backends import BackendRegistry
from multiserve.settings import Settings
from tests.conftest import ADMIN_TOKEN, RunningServer, StartServer, free_port
from tests.helpers import AUTH, wait_for
from tests.npz_backend import write_npz_model

TOKEN = {"authorization": f"Bearer {ADMIN_TOKEN}"}
ONES_TENSOR = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0] * 4}
X = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


@pytest.fixture(scope="module")
def shared(example_models: Path) -> Iterator[RunningServer]:
    """One server on the example models for the tests that change nothing but its cache."""
    settings = Settings.load(
        environ={},
        overrides={"models": str(example_models), "settle_window_s": 0, "admin_token": ADMIN_TOKEN},
    )
    server = RunningServer(settings, BackendRegistry()).start()
    # Ready (backends imported, versions settled) before the first test asks: on a busy
    # machine start-up can take seconds, and test_health_and_server_metadata asserts ready.
    wait_for(lambda: httpx.get(f"{server.url}/readyz").status_code == 200, 60, "readiness")
    yield server
    server.stop()


@pytest.fixture
def client(shared: RunningServer) -> Iterator[tg.InferenceServerClient]:
    with tg.InferenceServerClient(shared.grpc_target) as triton:
        yield triton


@pytest.fixture
def stub(shared: RunningServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(shared.grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def onnx_run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, inputs))


def raw_input(name: str, array: np.ndarray, datatype: str) -> tg.InferInput:
    tensor = tg.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


@dataclass
class Status:
    code: grpc.StatusCode
    details: str
    trailers: dict[str, str]


def status_of(call: Callable[[], object]) -> Status:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value  # a grpc.Call too
    status = Status(error.code(), error.details(), dict(error.trailing_metadata() or ()))
    assert "Traceback" not in status.details
    return status


def versions_of(server: RunningServer, model: str) -> list[str]:
    return [v["version"] for v in httpx.get(f"{server.url}/models/{model}").json()["versions"]]


def http_error(server: RunningServer, method: str, path: str, **kwargs: Any) -> tuple[int, str]:
    response = httpx.request(method, server.url + path, timeout=30, **kwargs)
    return response.status_code, response.json()["error"]


# --- health, metadata, readiness --------------------------------------------------------------


def test_health_and_server_metadata(client: tg.InferenceServerClient) -> None:
    assert client.is_server_live()
    # Ready once the first scan's versions settle (importing torch for the examples takes a
    # moment on a busy machine): not necessarily as soon as the socket listens.
    wait_for(client.is_server_ready, 30, "the server to be ready")
    metadata = client.get_server_metadata(as_json=True)
    assert metadata["name"] == "multiserve"
    assert set(metadata["extensions"]) >= {"model_repository", "statistics"}


def test_model_metadata_is_the_http_faces(
    client: tg.InferenceServerClient, shared: RunningServer
) -> None:
    for name, version in [("mlp", ""), ("mlp", "1"), ("counter", "1"), ("adder", "")]:
        metadata = client.get_model_metadata(name, version, as_json=True)
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        over_http = httpx.get(shared.url + path).json()
        for tensor in metadata["inputs"] + metadata["outputs"]:
            tensor["shape"] = [int(d) for d in tensor["shape"]]  # int64 is a string in JSON
        assert metadata == over_http
    metadata = client.get_model_metadata("mlp")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("x", "FP32", [-1, 4])
    ]


def test_model_readiness(client: tg.InferenceServerClient) -> None:
    assert client.is_model_ready("mlp")
    assert client.is_model_ready("mlp", "1")
    # As Triton answers them: not ready, rather than an error.
    assert not client.is_model_ready("mlp", "7")
    assert not client.is_model_ready("nope")


# --- inference ----------------------------------------------------------------------------


def test_raw_tensors_match_onnxruntime(
    client: tg.InferenceServerClient, shared: RunningServer
) -> None:
    models = Path(shared.model_server.settings.models)
    result = client.infer("mlp", [raw_input("x", X, "FP32")], request_id="req-42")
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == ("req-42", "mlp", "2")
    (expected,) = onnx_run(models / "mlp/2/model.onnx", {"x": X})
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 3, np.float32)
    result = client.infer(
        "adder",
        [raw_input("a", a, "FP32"), raw_input("b", b, "FP32")],
        model_version="1",
        outputs=[tg.InferRequestedOutput("product")],
    )
    assert [o.name for o in result.get_response().outputs] == ["product"]
    np.testing.assert_array_equal(
        result.as_numpy("product"), onnx_run(models / "adder/1/model.onnx", {"a": a, "b": b})[1]
    )

    ids = np.array([5, -1, 0], dtype=np.int64)
    result = client.infer("counter", [raw_input("ids", ids, "INT64")])
    np.testing.assert_array_equal(result.as_numpy("next"), [6, 0, 1])
    np.testing.assert_array_equal(result.as_numpy("positive"), [True, False, False])


def test_typed_contents_are_answered_typed(
    stub: pb_grpc.GRPCInferenceServiceStub, shared: RunningServer
) -> None:
    models = Path(shared.model_server.settings.models)
    request = pb.ModelInferRequest(model_name="mlp", model_version="1", id="t")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    tensor.contents.fp32_contents.extend(X.ravel().tolist())
    response = stub.ModelInfer(request)
    assert not response.raw_output_contents
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [2, 3])
    (expected,) = onnx_run(models / "mlp/1/model.onnx", {"x": X})
    got = np.array(output.contents.fp32_contents, np.float32).reshape(2, 3)
    np.testing.assert_array_equal(got, expected)
    assert (response.id, response.model_version) == ("t", "1")

    request = pb.ModelInferRequest(model_name="counter")
    tensor = request.inputs.add(name="ids", datatype="INT64", shape=[3])
    tensor.contents.int64_contents.extend([5, -1, 0])
    outputs = {o.name: o for o in stub.ModelInfer(request).outputs}
    assert list(outputs["next"].contents.int64_contents) == [6, 0, 1]
    assert list(outputs["positive"].contents.bool_contents) == [True, False, False]


def test_streamed_requests_are_answered_each_with_its_id(
    client: tg.InferenceServerClient, shared: RunningServer
) -> None:
    models = Path(shared.model_server.settings.models)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        rows = [X[i % 2 : i % 2 + 1] * (i + 1) for i in range(6)]
        for i, row in enumerate(rows):
            client.async_stream_infer("mlp", [raw_input("x", row, "FP32")], request_id=str(i))
        client.async_stream_infer("mlp", [raw_input("z", X, "FP32")], request_id="bad")
        got = [answers.get(timeout=30) for _ in range(len(rows) + 1)]
    finally:
        client.stop_stream()
    errors = [error for result, error in got if error is not None]
    assert len(errors) == 1
    assert "unknown input 'z'" in errors[0].message()
    results = {result.get_response().id: result for result, error in got if error is None}
    assert set(results) == {str(i) for i in range(len(rows))}
    for i, row in enumerate(rows):
        (expected,) = onnx_run(models / "mlp/2/model.onnx", {"x": row})
        np.testing.assert_array_equal(results[str(i)].as_numpy("probabilities"), expected)


# --- errors -------------------------------------------------------------------------------


def _http_twin(tensor: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [tensor]}
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


BAD_REQUESTS = [
    # (what, model, version, name, array, datatype, outputs, gRPC code, HTTP status)
    ("unknown model", "nope", "", "x", X, "FP32", None, "NOT_FOUND", 404),
    ("unknown version", "mlp", "7", "x", X, "FP32", None, "NOT_FOUND", 404),
    ("wrong datatype", "mlp", "", "x", X.astype(np.float64), "FP64", None, "INVALID_ARGUMENT", 400),
    ("unknown input", "mlp", "", "z", X, "FP32", None, "INVALID_ARGUMENT", 400),
    ("wrong shape", "mlp", "", "x", X[:, :3], "FP32", None, "INVALID_ARGUMENT", 400),
    ("unknown output", "mlp", "", "x", X, "FP32", ["q"], "INVALID_ARGUMENT", 400),
]


@pytest.mark.parametrize(
    ("model", "version", "name", "array", "datatype", "outputs", "code", "status"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_requests_get_the_http_faces_message_and_their_code(
    client: tg.InferenceServerClient,
    shared: RunningServer,
    model: str,
    version: str,
    name: str,
    array: np.ndarray,
    datatype: str,
    outputs: list[str] | None,
    code: str,
    status: int,
) -> None:
    requested = None if outputs is None else [tg.InferRequestedOutput(o) for o in outputs]
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model, [raw_input(name, array, datatype)], version, outputs=requested)
    tensor = {"name": name, "datatype": datatype, "shape": list(array.shape)}
    tensor["data"] = array.ravel().tolist()
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    http_status, message = http_error(shared, "POST", path, json=_http_twin(tensor, outputs))
    assert http_status == status
    assert caught.value.status() == f"StatusCode.{code}"
    assert caught.value.message() == message


def test_malformed_messages_are_invalid_argument(
    stub: pb_grpc.GRPCInferenceServiceStub, shared: RunningServer
) -> None:
    with grpc.insecure_channel(shared.grpc_target) as channel:
        raw_call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", None, None)
        error = status_of(lambda: raw_call(b"\xff\xff\xff"))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a ModelInferRequest" in error.details

    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.inputs.add(name="y", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(X[:1].tobytes())
    error = status_of(lambda: stub.ModelInfer(request))
    assert error.details == "raw_input_contents has 1 entries for 2 inputs"

    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.int64_contents.extend(
        [1, 2, 3, 4]
    )
    error = status_of(lambda: stub.ModelInfer(request))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "FP32 values go in contents.fp32_contents" in error.details

    request = pb.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(X[:1, :2].tobytes())
    error = status_of(lambda: stub.ModelInfer(request))
    assert "8 bytes of binary data do not hold 4 FP32" in error.details


@pytest.fixture
def troubled(start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry) -> Any:
    """A server whose models fail in every way there is: too large for the memory budget,
    raising inside predict, failing to load, still settling; and a small request limit."""
    rng = np.random.default_rng(0)
    write_npz_model(tmp_path / "small" / "1", rng.normal(size=(4, 2)))
    write_npz_model(tmp_path / "huge" / "1", rng.normal(size=(2048, 2048)))  # 16 MiB
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    for version_dir in tmp_path.glob("*/1"):
        (version_dir / "READY").touch()
    server = start_server(
        tmp_path,
        npz_registry,
        max_memory="8MiB",
        settle_window_s=60,
        max_request_bytes="64KiB",
    )
    return server, tmp_path


def test_every_error_status_with_the_http_faces_message(troubled: Any) -> None:
    server, root = troubled
    ones = np.ones((1, 4), np.float32)
    with tg.InferenceServerClient(server.grpc_target) as client:

        def grpc_error(model: str, array: np.ndarray, version: str = "") -> Any:
            with pytest.raises(InferenceServerException) as caught:
                client.infer(model, [raw_input("x", array, "FP32")], version)
            return caught.value

        def http_twin(model: str, array: np.ndarray, version: str = "") -> tuple[int, str]:
            # Binary tensor data, as JSON has no NaN.
            data = array.tobytes()
            parameters = {"binary_data_size": len(data)}
            tensor = {"name": "x", "datatype": "FP32", "shape": list(array.shape)}
            header = orjson.dumps({"inputs": [{**tensor, "parameters": parameters}]})
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
            length = {"Inference-Header-Content-Length": str(len(header))}
            return http_error(server, "POST", path, content=header + data, headers=length)

        cases = [
            ("huge", np.ones((1, 2048), np.float32), "", "RESOURCE_EXHAUSTED", 507),
            ("small", np.full((1, 4), np.nan, np.float32), "", "INTERNAL", 500),
            ("broken", ones, "", "UNAVAILABLE", 503),
        ]
        for model, array, version, code, status in cases:
            error = grpc_error(model, array, version)
            assert http_twin(model, array, version) == (status, error.message())
            assert error.status() == f"StatusCode.{code}", model

        # Settling: UNAVAILABLE with the retry hint HTTP gives as Retry-After.
        write_npz_model(root / "small" / "2", np.ones((4, 2), np.float32))
        wait_for(lambda: "2" in versions_of(server, "small"), 10, "version 2 to be seen")
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="small", model_version="2")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
            request.raw_input_contents.append(ones.tobytes())
            error = status_of(lambda: stub.ModelInfer(request))
            # Both faces wait settle_wait_s (5 s) for the version before answering: httpx's
            # default timeout is also 5 s, so give the HTTP twin room.
            response = httpx.post(
                server.url + "/v2/models/small/versions/2/infer",
                json={
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]
                },
                timeout=30,
            )
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert error.details == response.json()["error"]
            trailers = error.trailers
            assert trailers["retry-after"] == response.headers["retry-after"] == "1"
            assert trailers["grpc-retry-pushback-ms"] == "1000"

            # Over max_request_bytes: RESOURCE_EXHAUSTED (from grpc itself), as HTTP's 413.
            big = np.ones((1, 20_000), np.float32)  # 80 kB > 64 KiB
            request = pb.ModelInferRequest(model_name="small")
            request.inputs.add(name="x", datatype="FP32", shape=[1, 20_000])
            request.raw_input_contents.append(big.tobytes())
            error = status_of(lambda: stub.ModelInfer(request))
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "65536" in error.details
            assert http_twin("small", big)[0] == 413

        # A pinned model is not unloaded: FAILED_PRECONDITION, HTTP's 409.
        assert httpx.post(server.url + "/admin/models/small/1/pin", headers=AUTH).status_code == 200
        with pytest.raises(InferenceServerException) as caught:
            client.unload_model("small", headers=TOKEN)
        status, message = http_error(
            server, "POST", "/v2/repository/models/small/unload", headers=AUTH
        )
        assert (status, caught.value.status()) == (409, "StatusCode.FAILED_PRECONDITION")
        assert caught.value.message() == message

        # Without the token: UNAUTHENTICATED, HTTP's 401.
        for headers in ({}, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as caught:
                client.get_model_repository_index(headers=headers)
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        status, message = http_error(server, "POST", "/v2/repository/index")
        assert status == 401
        assert caught.value.message() == message

        # The server kept serving through all of it.
        assert client.infer("small", [raw_input("x", ones, "FP32")]).as_numpy("y").shape == (1, 2)


# --- the repository extension, configuration and statistics -------------------------------


def test_repository_load_and_unload_need_the_token(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "adder" / "config.toml").write_text("max_batch_size = 8\n")
    server = start_server(model_repo)
    cache = server.model_server.lifecycle.cache
    with tg.InferenceServerClient(server.grpc_target) as client:
        index = {(m.name, m.version): m for m in client.get_model_repository_index(TOKEN).models}
        assert index[("adder", "1")].state == "UNAVAILABLE"
        for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": ADMIN_TOKEN}):
            with pytest.raises(InferenceServerException) as caught:
                client.load_model("adder", headers=headers)
            assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
            assert ("adder", 1) not in cache
        client.load_model("adder", headers=TOKEN)
        assert ("adder", 1) in cache
        # One model cache: the HTTP face sees what the gRPC face loaded.
        assert httpx.get(server.url + "/models/adder").json()["versions"][0]["state"] == "ready"
        ready = client.get_model_repository_index(TOKEN, as_json=True)["models"]
        assert {"name": "adder", "version": "1", "state": "READY"} in ready

        with pytest.raises(InferenceServerException) as caught:
            client.unload_model("adder")
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        assert ("adder", 1) in cache
        client.unload_model("adder", headers=TOKEN)
        assert ("adder", 1) not in cache

        config = client.get_model_config("adder", as_json=True)["config"]
        assert config["max_batch_size"] == 8  # batching: dims without the batch dimension
        assert config["input"][0] == {"name": "a", "data_type": "TYPE_FP32", "dims": ["3"]}
        config = client.get_model_config("mlp", "1", as_json=True)["config"]
        assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnx")
        assert config.get("max_batch_size", 0) == 0
        assert config["output"][0]["dims"] == ["-1", "3"]


def test_statistics_count_both_protocols(start_server: StartServer, model_repo: Path) -> None:
    server = start_server(model_repo)
    with tg.InferenceServerClient(server.grpc_target) as client:
        for _ in range(3):
            client.infer("mlp", [raw_input("x", X, "FP32")])
        with server.client() as http:
            for _ in range(2):
                assert http.post("/models/mlp/predict", json={"inputs": X.tolist()}).is_success
        stats = client.get_inference_statistics("mlp", "2", as_json=True)["model_stats"]
        (entry,) = stats
        assert entry["inference_count"] == entry["execution_count"] == "5"
        assert entry["inference_stats"]["success"]["count"] == "5"
        assert int(entry["last_inference"]) > 0
        every = client.get_inference_statistics(as_json=True)["model_stats"]
        assert {(e["name"], e["version"]) for e in every} >= {("mlp", "1"), ("counter", "1")}
    metrics = httpx.get(server.url + "/metrics").text
    assert 'multiserve_grpc_requests_total{code="OK",method="ModelInfer"} 3.0' in metrics
    assert 'multiserve_predictions_total{model="mlp",status="200",version="2"} 5.0' in metrics


# --- a hot swap under gRPC load, and shutting down ----------------------------------------


def latest_answer_is(answers: list[tuple[str, float, float]], version: str) -> bool:
    return bool(answers) and answers[-1][0] == version


def test_hot_swap_under_grpc_load_fails_no_request(
    start_server: StartServer, tmp_path: Path
) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(1.0, 256 * 1024))
    (tmp_path / "m" / "1" / "READY").touch()
    server = start_server(tmp_path, settle_window_s=0.2)
    stop = threading.Event()
    answers: list[tuple[str, float, float]] = []
    failures: list[str] = []

    def infer_continuously(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with tg.InferenceServerClient(server.grpc_target) as client:
            while not stop.is_set():
                x = rng.normal(size=(1, 4)).astype(np.float32)
                try:
                    result = client.infer("m", [raw_input("x", x, "FP32")])
                except InferenceServerException as exc:
                    failures.append(str(exc))
                    continue
                version = result.get_response().model_version
                answers.append((version, float(x[0, 0]), float(result.as_numpy("y")[0, 0])))

    clients = [threading.Thread(target=infer_continuously, args=(seed,)) for seed in range(3)]
    for thread in clients:
        thread.start()
    try:
        for number in (2, 3, 4):
            target = tmp_path / "m" / str(number) / "model.onnx"
            target.parent.mkdir()
            target.write_bytes(scaled_onnx_bytes(float(number), 256 * 1024))
            wait_for(functools.partial(latest_answer_is, answers, str(number)), 10, f"v{number}")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
    assert failures == []
    assert len(answers) > 50
    assert {version for version, _, _ in answers} == {"1", "2", "3", "4"}
    for version, x0, y0 in answers:
        # Every answer comes from one complete version: y = x * version, exactly.
        assert np.float32(y0) == np.float32(x0) * np.float32(int(version))


def test_shutdown_lets_running_calls_of_both_servers_finish(
    tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.ones((4, 2), np.float32))
    (tmp_path / "slow" / "config.toml").write_text("predict_delay_s = 1.0\nwarmup = false\n")
    settings = Settings.load(
        environ={},
        overrides={"models": str(tmp_path), "settle_window_s": 0, "admin_token": ADMIN_TOKEN},
    )
    server = RunningServer(settings, npz_registry).start()
    metrics = server.model_server.metrics
    outcomes: dict[str, Any] = {}
    ones = np.ones((1, 4), np.float32)

    def over_grpc() -> None:
        with tg.InferenceServerClient(server.grpc_target) as client:
            outcomes["grpc"] = client.infer("slow", [raw_input("x", ones, "FP32")]).as_numpy("y")

    def over_http() -> None:
        response = httpx.post(server.url + "/models/slow/predict", json={"inputs": [[1] * 4]})
        outcomes["http"] = response.status_code

    # The model runs one call at a time: HTTP's first (1 s), gRPC's after it (2 s), so the
    # gRPC call is still running when uvicorn has drained HTTP and the lifespan ends.
    callers = [threading.Thread(target=over_http), threading.Thread(target=over_grpc)]
    try:
        with httpx.Client(base_url=server.url) as warm:  # the first call loads the model
            assert warm.post("/models/slow/predict", json={"inputs": [[1] * 4]}).is_success
        callers[0].start()
        wait_for(lambda: metrics.in_flight == 1, 10, "the HTTP call")
        callers[1].start()
        wait_for(lambda: metrics.rpcs_in_flight == 1, 10, "the gRPC call")
    finally:
        started = time.monotonic()
        server.stop()
        for thread in callers:
            thread.join(timeout=30)
    assert outcomes["http"] == 200
    np.testing.assert_array_equal(outcomes["grpc"], [[4.0, 4.0]])
    assert time.monotonic() - started < 10
    # Both ports are closed, and the models with them.
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz")
    with (
        tg.InferenceServerClient(server.grpc_target) as client,
        pytest.raises(InferenceServerException),
    ):
        client.is_server_live(client_timeout=2)
    assert len(server.model_server.lifecycle.cache) == 0


def test_grpc_port_zero_turns_grpc_off(start_server: StartServer, model_repo: Path) -> None:
    server = start_server(model_repo, grpc_port=0)
    app = server.app.app
    assert isinstance(app, Starlette)
    assert app.state.grpc_server is None
    with server.client() as client:
        assert client.get("/v2/health/ready").json() == {"ready": True}


# --- the command line ---------------------------------------------------------------------


def test_the_cli_serves_grpc_and_a_taken_port_stops_start_up(example_models: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "multiserve", "serve", "--models", str(example_models)]
    process = subprocess.Popen(
        [*command, "--port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        with tg.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            deadline = time.monotonic() + 30
            while True:
                try:
                    if client.is_server_ready(client_timeout=1):
                        break
                except InferenceServerException:
                    pass
                assert process.poll() is None, process.communicate()[0]
                assert time.monotonic() < deadline, "the gRPC server did not become ready"
                time.sleep(0.1)
            assert client.infer("mlp", [raw_input("x", X, "FP32")]).as_numpy(
                "probabilities"
            ).shape == (2, 3)

        # A second server on the same gRPC port must not start (SO_REUSEPORT is off).
        taken = subprocess.run(
            [*command, "--port", str(free_port()), "--grpc-port", str(grpc_port)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert taken.returncode != 0
        assert f"grpc_port: cannot listen on 127.0.0.1:{grpc_port}" in taken.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode in (0, -signal.SIGTERM), output
    assert f"gRPC (Open Inference Protocol) on 127.0.0.1:{grpc_port}" in output
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", grpc_port)) != 0
