"""Dynamic batching (``max_batch_size`` in a model's config.toml) over HTTP: many concurrent
requests, each answered with exactly what the runtime gives for its own input alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from tests.conftest import StartServer
from tests.helpers import error_of


def test_batched_requests_get_their_own_answers(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "mlp/config.toml").write_text("max_batch_size = 8\ninference_threads = 2\n")
    session = ort.InferenceSession(
        str(model_repo / "mlp/2/model.onnx"), providers=["CPUExecutionProvider"]
    )
    rng = np.random.default_rng(7)
    inputs = [rng.normal(size=(1 + i % 3, 4)).astype(np.float32) for i in range(96)]
    expected = [session.run(["probabilities"], {"x": x})[0] for x in inputs]
    bad = {5, 40, 77}  # wrong feature count: each must fail alone, with a 400

    with start_server(model_repo).client() as client:

        def ask(i: int) -> tuple[int, dict[str, object]]:
            x = inputs[i] if i not in bad else inputs[i][:, :3]
            response = client.post("/models/mlp/2/predict", json={"inputs": x.tolist()})
            return response.status_code, response.json()

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(len(inputs))))

    for i, (status, body) in enumerate(answers):
        if i in bad:
            assert status == 400, body
            continue
        assert status == 200, body
        outputs = body["outputs"]
        assert isinstance(outputs, dict)
        got = np.asarray(outputs["probabilities"], np.float32)
        np.testing.assert_allclose(got, expected[i], rtol=1e-5, atol=1e-6)


def test_batching_a_model_without_a_dynamic_first_dimension_is_a_load_error(
    start_server: StartServer, tmp_path: Path
) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "fixed/1").mkdir(parents=True)
    onnx.save(model, str(tmp_path / "fixed/1/model.onnx"))
    (tmp_path / "fixed/config.toml").write_text("max_batch_size = 4\n")
    with start_server(tmp_path).client() as client:
        error = error_of(client.post("/models/fixed/predict", json={"inputs": [[1, 2, 3, 4]]}), 503)
    assert "dynamic first dimension" in error["message"]
