"""Every error is a JSON body {"error": {"code", "message"}} with the right status, never a
traceback, and never takes the model or the server down."""

from __future__ import annotations

import io
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import httpx
import numpy as np
import pytest

from multiserve.backends import BackendRegistry
from tests.conftest import StartServer
from tests.helpers import error_of

NPY = "application/x-npy"


@pytest.fixture
def small_limit_client(start_server: StartServer, example_models: Path) -> Iterator[httpx.Client]:
    with start_server(example_models, max_request_bytes=1024).client() as client:
        yield client


@pytest.mark.parametrize(
    ("body", "code", "fragment"),
    [
        (b"{not json", "malformed_request", "not valid JSON"),
        (b"[1, 2, 3]", "malformed_request", '{"inputs"'),
        (b'{"instances": [[1, 2, 3, 4]]}', "malformed_request", '{"inputs"'),
        (b'{"inputs": {"y": [[1, 2, 3, 4]]}}', "invalid_input", "unknown input 'y'"),
        (b'{"inputs": {}}', "invalid_input", "missing input 'x'"),
        (
            b'{"inputs": [["a", "b", "c", "d"]]}',
            "invalid_input",
            "expected float32 values, got strings",
        ),
        (b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', "invalid_input", "not a rectangular array"),
        (b'{"inputs": [1, 2, 3, 4]}', "invalid_input", "expected shape [-1, 4], got [4]"),
        (b'{"inputs": [[1, 2, 3]]}', "invalid_input", "expected shape [-1, 4], got [1, 3]"),
        (b'{"inputs": [[1, null, 3, 4]]}', "invalid_input", "mixed or unsupported"),
    ],
)
def test_bad_json_inputs_are_400(
    client: httpx.Client, body: bytes, code: str, fragment: str
) -> None:
    response = client.post(
        "/models/mlp/2/predict", content=body, headers={"content-type": "application/json"}
    )
    error = error_of(response, 400)
    assert error["code"] == code
    assert fragment in error["message"]


def test_floats_for_an_integer_input_are_400(client: httpx.Client) -> None:
    error = error_of(client.post("/models/counter/1/predict", json={"inputs": [1.5, 2]}), 400)
    assert "expected int64 values, got floats" in error["message"]


def test_integers_too_large_for_the_input_are_400(client: httpx.Client) -> None:
    error = error_of(client.post("/models/counter/1/predict", json={"inputs": [2**70]}), 400)
    assert error["code"] == "invalid_input"


def test_list_body_for_a_two_input_model_is_400(client: httpx.Client) -> None:
    error = error_of(client.post("/models/adder/1/predict", json={"inputs": [[1, 2, 3]]}), 400)
    assert "'a', 'b'" in error["message"]


def test_npy_body_for_a_two_input_model_is_400(client: httpx.Client) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((1, 3), np.float32))
    response = client.post(
        "/models/adder/1/predict", content=buffer.getvalue(), headers={"content-type": NPY}
    )
    assert "single-input" in error_of(response, 400)["message"]


def test_corrupt_npy_body_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/models/mlp/2/predict", content=b"\x93NUMPY garbage", headers={"content-type": NPY}
    )
    assert error_of(response, 400)["code"] == "malformed_request"


def test_pickled_npy_body_is_refused(client: httpx.Client) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    response = client.post(
        "/models/mlp/2/predict", content=buffer.getvalue(), headers={"content-type": NPY}
    )
    assert error_of(response, 400)["code"] == "malformed_request"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/models/nope/predict", "model_not_found"),
        ("/models/nope/1/predict", "model_not_found"),
        ("/models/mlp/9/predict", "version_not_found"),
        ("/models/mlp/abc/predict", "version_not_found"),
        ("/models/mlp/0/predict", "version_not_found"),
        ("/models/mlp/02/predict", "version_not_found"),
        ("/nope", "not_found"),
    ],
)
def test_unknown_models_versions_and_routes_are_404(
    client: httpx.Client, path: str, code: str
) -> None:
    assert error_of(client.post(path, json={"inputs": [[1, 2, 3, 4]]}), 404)["code"] == code


@pytest.mark.parametrize("path", ["/models/nope", "/models/mlp/9", "/models/nope/1"])
def test_unknown_metadata_is_404(client: httpx.Client, path: str) -> None:
    error_of(client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/models/mlp/2/predict"),
        ("GET", "/models/mlp/predict"),
        ("POST", "/models/mlp/2"),
        ("DELETE", "/models"),
        ("POST", "/healthz"),
    ],
)
def test_wrong_method_is_405(client: httpx.Client, method: str, path: str) -> None:
    error = error_of(client.request(method, path), 405)
    assert error["code"] == "method_not_allowed"


def test_npy_response_for_two_outputs_needs_a_choice(client: httpx.Client) -> None:
    body = {"inputs": {"a": [[1, 2, 3]], "b": [[1, 1, 1]]}}
    response = client.post("/models/adder/1/predict", json=body, headers={"accept": NPY})
    assert "?output=" in error_of(response, 406)["message"]
    response = client.post(
        "/models/adder/1/predict?output=nope", json=body, headers={"accept": NPY}
    )
    assert "unknown output 'nope'" in error_of(response, 400)["message"]


def test_body_over_the_limit_is_413(small_limit_client: httpx.Client) -> None:
    big = {"inputs": [[1.0, 2.0, 3.0, 4.0]] * 200}
    error = error_of(small_limit_client.post("/models/mlp/2/predict", json=big), 413)
    assert "1024" in error["message"]


def test_chunked_body_over_the_limit_is_413(small_limit_client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": ['
        for _ in range(100):
            yield b"[1.0, 2.0, 3.0, 4.0],"
        yield b"[1, 2, 3, 4]]}"

    response = small_limit_client.post(
        "/models/mlp/2/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    error_of(response, 413)
    # The server is fine afterwards.
    assert (
        small_limit_client.post(
            "/models/mlp/2/predict", json={"inputs": [[1, 2, 3, 4]]}
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "image/png", b"application/\xffjson"],
)
def test_unsupported_content_type_is_415(client: httpx.Client, content_type: str | bytes) -> None:
    value = content_type if isinstance(content_type, bytes) else content_type.encode()
    response = client.post(
        "/models/mlp/2/predict", content=b"{}", headers=[(b"content-type", value)]
    )
    assert error_of(response, 415)["code"] == "unsupported_media_type"


def test_json_with_charset_is_accepted(client: httpx.Client) -> None:
    response = client.post(
        "/models/mlp/2/predict",
        content=b'{"inputs": [[1, 2, 3, 4]]}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert response.status_code == 200


def test_exception_inside_the_backend_is_500_and_the_model_keeps_serving(
    client: httpx.Client,
) -> None:
    # Batches of 2 and 3 pass the declared shapes (dynamic batch) but cannot be added.
    body = {"inputs": {"a": [[1, 2, 3]] * 2, "b": [[1, 2, 3]] * 3}}
    error = error_of(client.post("/models/adder/1/predict", json=body), 500)
    assert error["code"] == "prediction_failed"
    assert "adder version 1" in error["message"]
    ok = client.post(
        "/models/adder/1/predict", json={"inputs": {"a": [[1, 2, 3]], "b": [[1, 1, 1]]}}
    )
    assert ok.status_code == 200
    assert ok.json()["outputs"]["sum"] == [[2, 3, 4]]


def test_third_party_backend_exception_is_500(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    from tests.npz_backend import write_npz_model

    write_npz_model(tmp_path / "m" / "1", np.eye(2))
    buffer = io.BytesIO()
    np.save(buffer, np.array([[np.nan, 1.0]], np.float32))
    with start_server(tmp_path, npz_registry).client() as client:
        response = client.post(
            "/models/m/1/predict", content=buffer.getvalue(), headers={"content-type": NPY}
        )
        assert "FloatingPointError: input contains NaN" in error_of(response, 500)["message"]
        assert client.post("/models/m/1/predict", json={"inputs": [[1, 2]]}).json()["outputs"] == {
            "y": [[1, 2]]
        }


def test_corrupt_version_is_503_with_its_load_error(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "mlp/3").mkdir()
    (model_repo / "mlp/3/model.onnx").write_bytes(b"this is not an onnx model")
    with start_server(model_repo).client() as client:
        error = error_of(client.post("/models/mlp/3/predict", json={"inputs": [[1, 2, 3, 4]]}), 503)
        assert error["code"] == "model_load_failed"
        assert "mlp version 3" in error["message"]
        # latest is the highest version that loads: it falls back to 2.
        response = client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]})
        assert response.status_code == 200
        assert response.json()["model_version"] == "2"
        listing = client.get("/models/mlp").json()
        assert listing["latest"] == "2"
        failed = next(v for v in listing["versions"] if v["version"] == "3")
        assert failed["state"] == "failed"
        assert "mlp version 3" in failed["error"]


def test_model_whose_every_version_fails_is_503(start_server: StartServer, tmp_path: Path) -> None:
    (tmp_path / "broken/1").mkdir(parents=True)
    (tmp_path / "broken/1/model.onnx").write_bytes(b"\x00" * 10)
    with start_server(tmp_path).client() as client:
        error = error_of(client.post("/models/broken/predict", json={"inputs": [1]}), 503)
        assert "no version that loads" in error["message"]
        assert client.get("/models/broken").json()["latest"] is None


def test_missing_backend_names_the_package_to_install(
    start_server: StartServer, example_models: Path
) -> None:
    only_onnx = BackendRegistry(
        [ep for ep in entry_points(group="multiserve.backends") if ep.name == "onnx"]
    )
    with start_server(example_models, only_onnx).client() as client:
        error = error_of(
            client.post("/models/regressor/1/predict", json={"inputs": [[1, 2, 3, 4]]}), 503
        )
        assert error["code"] == "backend_not_installed"
        assert "pip install multiserve-torch" in error["message"]
        assert (
            client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]}).status_code == 200
        )


def test_bad_model_config_is_a_visible_load_error(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "adder/config.toml").write_text("intra_op_thread = 2\n")
    (model_repo / "mlp/2/config.toml").write_text("this is [not toml\n")
    with start_server(model_repo).client() as client:
        error = error_of(
            client.post(
                "/models/adder/1/predict", json={"inputs": {"a": [[1, 2, 3]], "b": [[1, 2, 3]]}}
            ),
            503,
        )
        assert "unknown onnx option intra_op_thread" in error["message"]
        error = error_of(client.post("/models/mlp/2/predict", json={"inputs": [[1, 2, 3, 4]]}), 503)
        assert "not valid TOML" in error["message"]


@pytest.mark.torch
def test_cuda_where_there_is_none_is_a_clear_load_error(
    start_server: StartServer, model_repo: Path
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    (model_repo / "mlp/config.toml").write_text('device = "cuda"\n')
    (model_repo / "regressor/config.toml").write_text('device = "cuda:0"\n')
    with start_server(model_repo).client() as client:
        error = error_of(client.post("/models/mlp/2/predict", json={"inputs": [[1, 2, 3, 4]]}), 503)
        assert "no CUDA execution provider" in error["message"]
        error = error_of(
            client.post("/models/regressor/1/predict", json={"inputs": [[1, 2, 3, 4]]}), 503
        )
        assert "sees no CUDA device" in error["message"]
