"""Predictions over HTTP equal a direct call of the runtime on the same input."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch

NPY = "application/x-npy"


def run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_onnx_prediction_matches_onnxruntime_exactly(
    client: httpx.Client, example_models: Path
) -> None:
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    response = client.post("/models/mlp/2/predict", json={"inputs": {"x": x.tolist()}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "mlp"
    assert body["model_version"] == "2"
    expected = run_onnx(example_models / "mlp/2/model.onnx", {"x": x})["probabilities"]
    np.testing.assert_array_equal(
        np.asarray(body["outputs"]["probabilities"], np.float32), expected
    )


def test_latest_and_bare_name_serve_the_highest_version(
    client: httpx.Client, example_models: Path
) -> None:
    x = [[0.5, -1.0, 2.0, 0.25]]
    expected = run_onnx(example_models / "mlp/2/model.onnx", {"x": np.asarray(x, np.float32)})
    for path in ("/models/mlp/latest/predict", "/models/mlp/predict"):
        response = client.post(path, json={"inputs": x})
        assert response.status_code == 200
        assert response.json()["model_version"] == "2"
        assert response.headers["x-model-version"] == "2"
        np.testing.assert_array_equal(
            np.asarray(response.json()["outputs"]["probabilities"], np.float32),
            expected["probabilities"],
        )


def test_older_version_is_addressable_by_number(client: httpx.Client, example_models: Path) -> None:
    x = np.ones((2, 4), np.float32)
    response = client.post("/models/mlp/1/predict", json={"inputs": x.tolist()})
    assert response.status_code == 200
    expected = run_onnx(example_models / "mlp/1/model.onnx", {"x": x})["probabilities"]
    np.testing.assert_array_equal(
        np.asarray(response.json()["outputs"]["probabilities"], np.float32), expected
    )
    other = run_onnx(example_models / "mlp/2/model.onnx", {"x": x})["probabilities"]
    assert not np.array_equal(expected, other)


def test_two_inputs_two_outputs(client: httpx.Client, example_models: Path) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, np.float32)
    response = client.post(
        "/models/adder/1/predict", json={"inputs": {"a": a.tolist(), "b": b.tolist()}}
    )
    assert response.status_code == 200
    expected = run_onnx(example_models / "adder/1/model.onnx", {"a": a, "b": b})
    outputs = response.json()["outputs"]
    assert set(outputs) == {"sum", "product"}
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(outputs[name], np.float32), value)


def test_integer_and_boolean_tensors(client: httpx.Client) -> None:
    response = client.post("/models/counter/1/predict", json={"inputs": [3, 0, -7]})
    assert response.status_code == 200
    assert response.json()["outputs"] == {"next": [4, 1, -6], "positive": [True, False, False]}


def test_npy_request_and_response(client: httpx.Client, example_models: Path) -> None:
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    response = client.post(
        "/models/mlp/2/predict", content=to_npy(x), headers={"content-type": NPY, "accept": NPY}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == NPY
    assert response.headers["x-model-version"] == "2"
    got = np.load(io.BytesIO(response.content), allow_pickle=False)
    expected = run_onnx(example_models / "mlp/2/model.onnx", {"x": x})["probabilities"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_npy_request_with_json_response(client: httpx.Client, example_models: Path) -> None:
    x = np.zeros((1, 4), np.float64)  # float64 on the wire, cast to the model's float32
    response = client.post(
        "/models/mlp/1/predict", content=to_npy(x), headers={"content-type": NPY}
    )
    assert response.status_code == 200
    expected = run_onnx(example_models / "mlp/1/model.onnx", {"x": x.astype(np.float32)})
    np.testing.assert_array_equal(
        np.asarray(response.json()["outputs"]["probabilities"], np.float32),
        expected["probabilities"],
    )


def test_npy_response_picks_one_output_by_query(client: httpx.Client) -> None:
    body = {"inputs": {"a": [[1, 2, 3]], "b": [[2, 2, 2]]}}
    response = client.post(
        "/models/adder/1/predict?output=product", json=body, headers={"accept": NPY}
    )
    assert response.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(response.content)), [[2, 4, 6]])


def _torch_reference(module: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        result: torch.Tensor = module(torch.from_numpy(x))
    return result.numpy()


@pytest.mark.torch
def test_torch_export_prediction_matches_torch(client: httpx.Client, example_models: Path) -> None:
    x = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32)
    response = client.post("/models/regressor/1/predict", json={"inputs": x.tolist()})
    assert response.status_code == 200, response.text
    module = torch.export.load(str(example_models / "regressor/1/model.pt2")).module()
    np.testing.assert_array_equal(
        np.asarray(response.json()["outputs"]["output_0"], np.float32), _torch_reference(module, x)
    )


@pytest.mark.torch
def test_torchscript_prediction_matches_torch(client: httpx.Client, example_models: Path) -> None:
    x = np.random.default_rng(3).normal(size=(2, 4)).astype(np.float32)
    response = client.post("/models/scaler/1/predict", json={"inputs": {"x": x.tolist()}})
    assert response.status_code == 200, response.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(example_models / "scaler/1/model.pt"))  # type: ignore[no-untyped-call]
    np.testing.assert_array_equal(
        np.asarray(response.json()["outputs"]["scores"], np.float32), _torch_reference(module, x)
    )


@pytest.mark.torch
def test_torch_batch_of_one_on_a_dynamic_batch(client: httpx.Client) -> None:
    response = client.post("/models/regressor/1/predict", json={"inputs": [[1, 2, 3, 4]]})
    assert response.status_code == 200
    assert np.asarray(response.json()["outputs"]["output_0"]).shape == (1, 2)
