"""Models the benchmark serves, written with ``onnx`` into temporary repositories.

The small model and the hot-swap versions come from ``examples/make_models.py``. The larger
models are dense two-layer perceptrons whose weights make up the size asked for, so that a
request reads every weight once: their cost grows with their size, as a real model's does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from examples.make_models import OPSET, write_mlp_onnx

DENSE_FEATURES = 64
MLP_FEATURES = 4
Float32Array = npt.NDArray[np.float32]


def write_dense_onnx(path: Path, target_bytes: int, seed: int = 0) -> Path:
    """``x`` float32 [batch, 64] -> MatMul -> Relu -> MatMul -> ``y`` float32 [batch, 64], with
    hidden width chosen so that the weights take about ``target_bytes``."""
    hidden = max(1, target_bytes // (2 * DENSE_FEATURES * 4))
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((DENSE_FEATURES, hidden), dtype=np.float32)
    w1 /= np.float32(np.sqrt(DENSE_FEATURES))
    w2 = rng.standard_normal((hidden, DENSE_FEATURES), dtype=np.float32)
    w2 /= np.float32(np.sqrt(hidden))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", DENSE_FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", DENSE_FEATURES])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_mlp(path: Path) -> Path:
    """The small model of the throughput section: ``mlp`` version 2 of the examples."""
    return write_mlp_onnx(path, seed=2)


def inputs(features: int, count: int = 64, seed: int = 0) -> list[Float32Array]:
    """``count`` distinct batch-1 inputs, cycled through so that no layer can answer from a
    cache of one request."""
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(1, features)).astype(np.float32) for _ in range(count)]


def json_body(x: Float32Array) -> bytes:
    return json.dumps({"inputs": x.tolist()}).encode()


def npy_body(x: Float32Array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x, allow_pickle=False)
    return buffer.getvalue()


def v2_body(x: Float32Array, input_name: str) -> bytes:
    """An Open Inference Protocol (V2) JSON request, as MLServer takes it."""
    tensor = {
        "name": input_name,
        "shape": list(x.shape),
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    return json.dumps({"inputs": [tensor]}).encode()


def link_models(source: Path, root: Path, names: list[str]) -> None:
    """One version of each named model, all hard links to ``source``: separate models to the
    server, one file on disk."""
    for name in names:
        target = root / name / "1" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(source)
        except OSError:
            target.write_bytes(source.read_bytes())
