"""The Open Inference Protocol (KServe V2), driven by the official Triton HTTP client, and
checked against onnxruntime on the same inputs."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import RunningServer, StartServer
from tests.helpers import AUTH, wait_for


@pytest.fixture
def server(start_server: StartServer, model_repo: Path) -> RunningServer:
    return start_server(model_repo)


@pytest.fixture
def triton_client(server: RunningServer) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def onnx_run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return list(session.run(None, inputs))


def test_server_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    # Ready once the first scan's versions settle (importing torch for the examples takes a
    # moment on a busy machine): not necessarily as soon as the socket listens.
    wait_for(triton_client.is_server_ready, 30, "the server to be ready")
    metadata = triton_client.get_server_metadata()
    assert metadata["name"] == "multiserve"
    assert set(metadata["extensions"]) >= {"binary_tensor_data", "model_repository"}


def test_model_metadata_and_readiness(triton_client: triton.InferenceServerClient) -> None:
    metadata = triton_client.get_model_metadata("mlp")
    assert metadata == {
        "name": "mlp",
        "versions": ["1", "2"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert triton_client.get_model_metadata("counter", "1")["inputs"][0]["datatype"] == "INT64"
    assert triton_client.is_model_ready("mlp")
    assert triton_client.is_model_ready("mlp", "1")
    assert not triton_client.is_model_ready("mlp", "7")
    assert not triton_client.is_model_ready("nope")


@pytest.mark.parametrize("binary", [False, True])
def test_infer_matches_onnxruntime(
    triton_client: triton.InferenceServerClient, model_repo: Path, binary: bool
) -> None:
    x = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = triton.InferRequestedOutput("probabilities", binary_data=binary)
    result = triton_client.infer("mlp", [tensor], outputs=[output], request_id="req-42")
    response = result.get_response()
    assert response["id"] == "req-42"
    assert response["model_name"] == "mlp"
    assert response["model_version"] == "2"
    (expected,) = onnx_run(model_repo / "mlp/2/model.onnx", {"x": x})
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_infer_two_inputs_selected_outputs_and_versions(
    triton_client: triton.InferenceServerClient, model_repo: Path
) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 3, np.float32)
    inputs = [triton.InferInput("a", [2, 3], "FP32"), triton.InferInput("b", [2, 3], "FP32")]
    inputs[0].set_data_from_numpy(a, binary_data=True)
    inputs[1].set_data_from_numpy(b, binary_data=False)
    outputs = [triton.InferRequestedOutput("product", binary_data=True)]
    result = triton_client.infer("adder", inputs, model_version="1", outputs=outputs)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["product"]
    _, product = onnx_run(model_repo / "adder/1/model.onnx", {"a": a, "b": b})
    np.testing.assert_array_equal(result.as_numpy("product"), product)
    assert result.as_numpy("sum") is None

    x = np.ones((1, 4), np.float32)
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    old = triton_client.infer("mlp", [tensor], model_version="1")
    (expected,) = onnx_run(model_repo / "mlp/1/model.onnx", {"x": x})
    np.testing.assert_array_equal(old.as_numpy("probabilities"), expected)


def test_integer_and_boolean_tensors(triton_client: triton.InferenceServerClient) -> None:
    ids = np.array([5, -1, 0], dtype=np.int64)
    tensor = triton.InferInput("ids", [3], "INT64")
    tensor.set_data_from_numpy(ids, binary_data=True)
    result = triton_client.infer("counter", [tensor])
    np.testing.assert_array_equal(result.as_numpy("next"), [6, 0, 1])
    np.testing.assert_array_equal(result.as_numpy("positive"), [True, False, False])


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: triton.InferInput("x", [1, 4], "FP64"), "does not match the model's FP32"),
        (lambda: triton.InferInput("z", [1, 4], "FP32"), "unknown input 'z'"),
        (lambda: triton.InferInput("x", [1, 3], "FP32"), "expected shape [-1, 4]"),
    ],
)
def test_bad_inputs_are_400(triton_client: triton.InferenceServerClient, make, fragment) -> None:
    tensor = make()
    shape = tuple(tensor.shape())
    dtype = np.float64 if tensor.datatype() == "FP64" else np.float32
    tensor.set_data_from_numpy(np.zeros(shape, dtype))
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer("mlp", [tensor])
    assert caught.value.status() == "400"
    assert fragment in caught.value.message()


def test_unknown_model_is_404(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        triton_client.infer("nope", [tensor])
    assert caught.value.status() == "404"


def test_repository_extension_loads_and_unloads(
    triton_client: triton.InferenceServerClient, server: RunningServer
) -> None:
    index = {
        (m["name"], m["version"]): m for m in triton_client.get_model_repository_index(headers=AUTH)
    }
    assert index[("adder", "1")]["state"] == "UNAVAILABLE"
    triton_client.load_model("adder", headers=AUTH)
    assert ("adder", 1) in server.model_server.lifecycle.cache
    ready = triton_client.get_model_repository_index(headers=AUTH)
    assert {"name": "adder", "version": "1", "state": "READY", "reason": ""} in ready
    triton_client.unload_model("adder", headers=AUTH)
    assert ("adder", 1) not in server.model_server.lifecycle.cache
    with pytest.raises(InferenceServerException) as caught:
        triton_client.load_model("adder")
    assert caught.value.status() == "401"


def test_raw_http_json_and_errors(server: RunningServer) -> None:
    with server.client() as client:
        body = {
            "id": "7",
            "inputs": [
                {
                    "name": "x",
                    "shape": [2, 4],
                    "datatype": "FP32",
                    "data": [[1, 2, 3, 4], [5, 6, 7, 8]],
                }
            ],
        }
        response = client.post("/v2/models/mlp/versions/2/infer", json=body)
        assert response.status_code == 200
        output = response.json()["outputs"][0]
        assert output["name"] == "probabilities"
        assert output["datatype"] == "FP32"
        assert output["shape"] == [2, 3]
        assert len(output["data"]) == 6  # flattened, row-major
        assert response.json()["id"] == "7"
        x = {"name": "x", "shape": [1, 4], "datatype": "FP32"}
        for bad in [
            b"{",
            b'{"inputs": 3}',
            orjson.dumps({"inputs": [x]}),
            orjson.dumps({"inputs": [{**x, "datatype": "FP8", "data": [1, 2, 3, 4]}]}),
            orjson.dumps({"inputs": [{**x, "data": [1, 2, 3]}]}),
            orjson.dumps({"inputs": [{**x, "shape": [1, -4], "data": [1, 2, 3, 4]}]}),
            orjson.dumps({"inputs": [{**x, "data": [1, 2, 3, 4]}], "outputs": [{"name": "q"}]}),
        ]:
            response = client.post("/v2/models/mlp/infer", content=bad)
            assert response.status_code == 400, response.text
            assert isinstance(response.json()["error"], str)
        assert client.get("/v2/nothing/here").json() == {
            "error": "no route for GET /v2/nothing/here"
        }


def test_binary_body_that_lies_about_sizes_is_400(server: RunningServer) -> None:
    x = {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    header = orjson.dumps({"inputs": [x]})
    with server.client() as client:
        for extra, length in [
            (b"\x00" * 8, len(header)),
            (b"\x00" * 20, len(header)),
            (b"\x00" * 16, len(header) + 99),
        ]:
            response = client.post(
                "/v2/models/mlp/infer",
                content=header + extra,
                headers={"Inference-Header-Content-Length": str(length)},
            )
            assert response.status_code == 400, response.text
        ok = client.post(
            "/v2/models/mlp/infer",
            content=header + struct.pack("<4f", 1, 2, 3, 4),
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert ok.status_code == 200


def test_v2_probes(server: RunningServer) -> None:
    with server.client() as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert client.get("/v2/models/mlp/ready").json() == {"name": "mlp", "ready": True}
        assert client.get("/v2/models/mlp/versions/9/ready").status_code == 404
        response = httpx.get(f"{server.url}/v2")
        assert response.json()["name"] == "multiserve"
