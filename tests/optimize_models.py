"""Models the optimisation tests derive from: each suits one kind of derivation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = 256
CLASSES = 8


def write_classifier(version_dir: Path, seed: int = 0, width: int = 1024, rows: int = 256) -> Path:
    """An ONNX classifier that int8 quantisation suits: its weights are dense MatMuls (enough
    work for integer kernels to pay), and its classes are far apart, as a trained model's are
    on the data it was trained for. ``x`` float32 [batch, 256] -> ``logits`` [batch, 8].

    Two blocks each expand the input into ``width`` units and fold it back (``relu(xQ) -
    relu(-xQ)`` is ``xQ``, and ``Q Q^T = I``), so the input reaches the last layer, which
    scores it against one prototype per class. ``reference.npz`` holds ``rows`` inputs near
    the prototypes, the sample the check runs on."""
    rng = np.random.default_rng(seed)
    weights: dict[str, np.ndarray] = {}
    nodes = []
    current = "x"
    for block in range(2):
        q, _ = np.linalg.qr(rng.standard_normal((width // 2, FEATURES)))  # orthonormal columns
        rows_q = q.T.astype(np.float32)  # [256, width/2], Q Q^T = I
        weights[f"expand{block}"] = np.concatenate([rows_q, -rows_q], axis=1)
        weights[f"fold{block}"] = np.concatenate([rows_q.T, -rows_q.T], axis=0)
        nodes += [
            helper.make_node("MatMul", [current, f"expand{block}"], [f"e{block}"]),
            helper.make_node("Relu", [f"e{block}"], [f"r{block}"]),
            helper.make_node("MatMul", [f"r{block}", f"fold{block}"], [f"h{block}"]),
        ]
        current = f"h{block}"
    prototypes = rng.standard_normal((CLASSES, FEATURES)).astype(np.float32)
    weights["classes"] = prototypes.T.copy()
    nodes.append(helper.make_node("MatMul", [current, "classes"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version_dir / "model.onnx"))
    labels = rng.integers(0, CLASSES, size=rows)
    near = prototypes[labels] + 0.3 * rng.standard_normal((rows, FEATURES)).astype(np.float32)
    np.savez(version_dir / "reference.npz", x=near.astype(np.float32))
    return version_dir / "model.onnx"


def classifier_logits(version_dir: Path, x: np.ndarray) -> np.ndarray:
    """What the original model answers, computed without multiserve."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(version_dir / "model.onnx"))
    result: np.ndarray = session.run(None, {"x": x})[0]
    return result


def write_torch_classifier(version_dir: Path, seed: int = 0, width: int = 1024) -> Path:
    """`write_classifier`'s model built with torch and saved as TorchScript (``model.pt``,
    with the ``config.toml`` that declares its tensors), with the same ``reference.npz``: for
    export, then int8."""
    import torch

    onnx_dir = version_dir.parent / f".{version_dir.name}-onnx"
    write_classifier(onnx_dir, seed=seed, width=width)
    graph = onnx.load(str(onnx_dir / "model.onnx")).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand0 = torch.nn.Buffer(torch.from_numpy(weights["expand0"].copy()))
            self.fold0 = torch.nn.Buffer(torch.from_numpy(weights["fold0"].copy()))
            self.expand1 = torch.nn.Buffer(torch.from_numpy(weights["expand1"].copy()))
            self.fold1 = torch.nn.Buffer(torch.from_numpy(weights["fold1"].copy()))
            self.classes = torch.nn.Buffer(torch.from_numpy(weights["classes"].copy()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(x @ self.expand0) @ self.fold0
            h = torch.relu(h @ self.expand1) @ self.fold1
            logits: torch.Tensor = h @ self.classes
            return logits

    version_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # TorchScript is deprecated upstream
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(Classifier().eval())
        scripted.save(str(version_dir / "model.pt"))  # type: ignore[no-untyped-call]
    (version_dir / "config.toml").write_text(
        f'[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, {FEATURES}]\n\n'
        f'[[outputs]]\nname = "logits"\ndtype = "float32"\nshape = [-1, {CLASSES}]\n'
    )
    (onnx_dir / "reference.npz").replace(version_dir / "reference.npz")
    (onnx_dir / "model.onnx").unlink()
    onnx_dir.rmdir()
    return version_dir / "model.pt"
