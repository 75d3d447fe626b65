"""Build small, real example models (ONNX, TorchScript, torch.export, a Python predictor) into a
model repository.

    .venv/bin/python examples/make_models.py [--out examples/models]

Running it again changes nothing: a file whose model is already there, identical, is left
untouched (a server watching the folder sees no change), and a changed file is replaced in one
rename, never written in place. The functions are also what the tests build their models with.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def write_mlp_onnx(
    path: Path, seed: int, features: int = 4, hidden: int = 16, classes: int = 3
) -> Path:
    """A two-layer perceptron with softmax: ``x`` float32 [batch, features] -> ``probabilities``."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(size=(features, hidden)).astype(np.float32),
        "b1": rng.normal(size=(hidden,)).astype(np.float32),
        "w2": rng.normal(size=(hidden, classes)).astype(np.float32),
        "b2": rng.normal(size=(classes,)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return _save(graph, path)


def write_adder_onnx(path: Path) -> Path:
    """Two inputs, two outputs: ``a``, ``b`` float32 [batch, 3] -> ``sum``, ``product``."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Mul", ["a", "b"], ["product"]),
        ],
        "adder",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("product", TensorProto.FLOAT, ["batch", 3]),
        ],
    )
    return _save(graph, path)


def write_counter_onnx(path: Path) -> Path:
    """Integer and boolean tensors: ``ids`` int64 [n] -> ``next`` int64, ``positive`` bool."""
    one = numpy_helper.from_array(np.array(1, dtype=np.int64), "one")
    zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["ids", "one"], ["next"]),
            helper.make_node("Greater", ["ids", "zero"], ["positive"]),
        ],
        "counter",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [
            helper.make_tensor_value_info("next", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("positive", TensorProto.BOOL, ["n"]),
        ],
        initializer=[one, zero],
    )
    return _save(graph, path)


def scaled_onnx_bytes(factor: float, padding_bytes: int = 0) -> bytes:
    """``x`` float32 [batch, 4] -> ``y = x * factor``: which version answered is in the answer.
    ``padding_bytes`` of weights that the graph carries but does not use make the file large
    enough for a copy of it to take a while."""
    # padding[0] is 0: adding its first element leaves y exact while the weights stay in use.
    padding = np.zeros(max(padding_bytes // 4, 1), dtype=np.float32)
    initializers = [
        numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor"),
        numpy_helper.from_array(padding, "padding"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "start"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "end"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "factor"], ["scaled"]),
            helper.make_node("Slice", ["padding", "start", "end"], ["zero"]),
            helper.make_node("Add", ["scaled", "zero"], ["y"]),
        ],
        "scaled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return write_if_changed(path, model.SerializeToString())


def write_if_changed(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` unless it already holds exactly that; a new file appears in
    one rename, so a reader never sees it half written."""
    try:
        if path.read_bytes() == data:
            return path
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _torch_mlp(seed: int, features: int = 4, classes: int = 2):  # type: ignore[no-untyped-def]
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(features, 8), torch.nn.ReLU(), torch.nn.Linear(8, classes)
    ).eval()


TORCHSCRIPT_CONFIG = """\
# TorchScript records no tensor names or shapes, so they are declared here.
[[inputs]]
name = "x"
dtype = "float32"
shape = [-1, 4]

[[outputs]]
name = "scores"
dtype = "float32"
shape = [-1, 2]
"""


def write_torchscript(version_dir: Path, seed: int) -> Path:
    """A TorchScript MLP ``x`` float32 [batch, 4] -> ``scores`` [batch, 2], with the config.toml
    that names its tensors."""
    import torch

    path = version_dir / "model.pt"
    module = _torch_mlp(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module)
        # TorchScript archives differ from save to save (a random id, the order of generated
        # code): an existing one holding the same weights is the same model, left as it is.
        if not _same_torchscript(path, scripted):
            buffer = io.BytesIO()
            torch.jit.save(scripted, buffer)
            write_if_changed(path, buffer.getvalue())
    write_if_changed(version_dir / "config.toml", TORCHSCRIPT_CONFIG.encode())
    return path


def _same_torchscript(path: Path, scripted: Any) -> bool:
    import torch

    try:
        existing = torch.jit.load(str(path))  # type: ignore[no-untyped-call]
    except (OSError, RuntimeError, ValueError):
        return False
    ours, theirs = scripted.state_dict(), existing.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)


def write_exported(version_dir: Path, seed: int) -> Path:
    """A ``torch.export`` MLP with a dynamic batch: ``x`` float32 [batch, 4] -> ``output_0``."""
    import torch

    program = torch.export.export(
        _torch_mlp(seed),
        (torch.zeros(2, 4),),
        dynamic_shapes={"input": {0: torch.export.Dim.DYNAMIC}},
    )
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return write_if_changed(version_dir / "model.pt2", buffer.getvalue())


# Fisher's iris measurements (cm), their means and standard deviations over the 150 flowers.
IRIS_SCALING = {
    "mean": {
        "sepal_length": 5.8433,
        "sepal_width": 3.0573,
        "petal_length": 3.7580,
        "petal_width": 1.1993,
    },
    "std": {
        "sepal_length": 0.8281,
        "sepal_width": 0.4359,
        "petal_length": 1.7653,
        "petal_width": 0.7622,
    },
}
IRIS_CONFIG = """\
# Read by the predictor (its __init__ gets this file as `config`): the model it calls.
classifier = "mlp"
classifier_version = "latest"
"""
IRIS_WARMUP = {
    "rows": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}]
}


def write_iris_predictor(version_dir: Path) -> Path:
    """A Python predictor (``examples/iris_predictor.py``) around the ``mlp`` model: named
    measurements in, scaled, run through ``mlp``, class labels with probabilities out. It is
    served only by a server started with ``--allow-python-predictors``."""
    source = Path(__file__).with_name("iris_predictor.py").read_bytes()
    write_if_changed(
        version_dir / "scaling.json", (json.dumps(IRIS_SCALING, indent=2) + "\n").encode()
    )
    write_if_changed(version_dir / "config.toml", IRIS_CONFIG.encode())
    write_if_changed(version_dir / "warmup.json", (json.dumps(IRIS_WARMUP) + "\n").encode())
    # Written last: the version is complete once its predictor is there.
    return write_if_changed(version_dir / "predictor.py", source)


def write_examples(root: Path) -> None:
    write_mlp_onnx(root / "mlp" / "1" / "model.onnx", seed=1)
    write_mlp_onnx(root / "mlp" / "2" / "model.onnx", seed=2)
    write_adder_onnx(root / "adder" / "1" / "model.onnx")
    write_counter_onnx(root / "counter" / "1" / "model.onnx")
    write_torchscript(root / "scaler" / "1", seed=3)
    write_exported(root / "regressor" / "1", seed=4)
    write_iris_predictor(root / "iris" / "1")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "models")
    args = parser.parse_args()
    write_examples(args.out)
    for path in sorted(args.out.rglob("*")):
        if path.is_file():
            print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
