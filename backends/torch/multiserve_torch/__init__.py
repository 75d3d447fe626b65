"""PyTorch backend for multiserve: serves ``model.pt2`` (``torch.export.save``) and ``model.pt``
(TorchScript).

Options (a model's config.toml):

- ``device``: ``cpu``, ``cuda`` or ``cuda:N``.
- ``[[inputs]]`` / ``[[outputs]]``: name, dtype, shape (-1 for dynamic) of each tensor, in the
  order ``forward`` takes and returns them. Required for TorchScript, which records no names
  or shapes; optional for ``model.pt2``, whose graph has them (outputs are then named
  ``output_0``, ``output_1``, ...).

Derives (``export = "onnx"`` in config.toml, see ``multiserve.optimize``): ``onnx``, the model
exported with ``torch.onnx.export`` and served by the onnx backend (``model.pt2`` needs the
``onnx`` extra: onnxscript).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multiserve.types import Array, ModelMetadata, TensorSpec, specs_from_config

EXPORTED = "model.pt2"
TORCHSCRIPT = "model.pt"
OPTIONS = frozenset({"device", "inputs", "outputs"})

_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


class TorchBackend:
    name = "torch"
    derivations = frozenset({"onnx"})

    def can_load(self, version_dir: Path) -> bool:
        return (version_dir / EXPORTED).is_file() or (version_dir / TORCHSCRIPT).is_file()

    def load(self, version_dir: Path, options: Mapping[str, Any]) -> TorchModel:
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown torch option {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}"
            )
        device = _device(str(options.get("device", "cpu")))
        if (version_dir / EXPORTED).is_file():
            module, metadata = _load_exported(version_dir / EXPORTED, device, options)
        else:
            module, metadata = _load_torchscript(version_dir / TORCHSCRIPT, device, options)
        tensors = [*module.parameters(), *module.buffers()]
        memory = sum(t.numel() * t.element_size() for t in tensors)
        if memory == 0:
            memory = sum(p.stat().st_size for p in version_dir.iterdir() if p.is_file())
        return TorchModel(module, metadata, memory, device)

    def derive(
        self, kind: str, version_dir: Path, options: Mapping[str, Any], out_dir: Path
    ) -> dict[str, Any]:
        from multiserve_torch.export import export_onnx

        if kind != "onnx":
            raise ValueError(f"the torch backend derives onnx, not {kind!r}")
        cpu = torch.device("cpu")  # exported on the CPU; the onnx backend moves it
        if (version_dir / EXPORTED).is_file():
            program = torch.export.load(str(version_dir / EXPORTED))
            module, metadata = _exported(program, cpu, options)
            return export_onnx(program, module, metadata, options, out_dir)
        module, metadata = _load_torchscript(version_dir / TORCHSCRIPT, cpu, options)
        return export_onnx(None, module, metadata, options, out_dir)


class TorchModel:
    def __init__(
        self,
        module: torch.nn.Module,
        metadata: ModelMetadata,
        memory_bytes: int,
        device: torch.device,
    ) -> None:
        self._module: torch.nn.Module | None = module
        self.metadata = metadata
        self.memory_bytes = memory_bytes
        self._device = device

    def predict(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        module = self._module
        if module is None:
            raise RuntimeError("the model is closed")
        args = [_tensor(inputs[spec.name], self._device) for spec in self.metadata.inputs]
        with torch.inference_mode():
            result = module(*args)
        return self._outputs(result)

    def _outputs(self, result: Any) -> dict[str, Array]:
        specs = self.metadata.outputs
        if isinstance(result, Mapping):
            missing = [spec.name for spec in specs if spec.name not in result]
            if missing:
                raise RuntimeError(f"forward() returned no {', '.join(missing)}")
            values = [result[spec.name] for spec in specs]
        else:
            values = list(result) if isinstance(result, list | tuple) else [result]
        if len(values) != len(specs):
            raise RuntimeError(
                f"forward() returned {len(values)} outputs where {len(specs)} are declared"
            )
        return {spec.name: _array(value) for spec, value in zip(specs, values, strict=True)}

    def close(self) -> None:
        self._module = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()


def _load_exported(
    path: Path, device: torch.device, options: Mapping[str, Any]
) -> tuple[torch.nn.Module, ModelMetadata]:
    return _exported(torch.export.load(str(path)), device, options)


def _exported(
    program: torch.export.ExportedProgram, device: torch.device, options: Mapping[str, Any]
) -> tuple[torch.nn.Module, ModelMetadata]:
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    nodes = {node.name: node for node in program.graph.nodes}
    inputs = tuple(
        _graph_spec(name, nodes[name].meta.get("val"))
        for name in program.graph_signature.user_inputs
    )
    output_node = next(node for node in program.graph.nodes if node.op == "output")
    output_values = [arg.meta.get("val") for arg in _flatten(output_node.args[0])]
    outputs = tuple(_graph_spec(f"output_{i}", val) for i, val in enumerate(output_values))
    if "inputs" in options:
        inputs = _declared(options["inputs"], "inputs", len(inputs))
    if "outputs" in options:
        outputs = _declared(options["outputs"], "outputs", len(outputs))
    return program.module(), ModelMetadata(inputs, outputs)


def _load_torchscript(
    path: Path, device: torch.device, options: Mapping[str, Any]
) -> tuple[torch.nn.Module, ModelMetadata]:
    if "inputs" not in options or "outputs" not in options:
        raise ValueError(
            "a TorchScript model records no tensor names or shapes: declare [[inputs]] and "
            "[[outputs]] in its config.toml (see config/model.example.toml)"
        )
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but still what many teams have; we serve it.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device)  # type: ignore[no-untyped-call]
    module.eval()
    arguments = [arg.name for arg in module.forward.schema.arguments[1:]]
    inputs = _declared(options["inputs"], "inputs", len(arguments))
    outputs = specs_from_config(options["outputs"], "outputs")
    return module, ModelMetadata(inputs, outputs)


def _declared(entries: Any, what: str, expected: int) -> tuple[TensorSpec, ...]:
    specs = specs_from_config(entries, what)
    if len(specs) != expected:
        raise ValueError(f"config.toml declares {len(specs)} {what}; the model has {expected}")
    return specs


def _graph_spec(name: str, value: Any) -> TensorSpec:
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"{name!r} is not a tensor ({type(value).__name__}); declare it in config.toml"
        )
    dtype = _DTYPES.get(value.dtype)
    if dtype is None:
        raise ValueError(f"{name!r} has dtype {value.dtype}, which multiserve cannot serve")
    shape = tuple(dim if isinstance(dim, int) else -1 for dim in value.shape)
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, Sequence):
        return [item for inner in value for item in _flatten(inner)]
    return [value]


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {text!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {text!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device {text!r} requested, but torch {torch.__version__} sees no CUDA device"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(
            f"device {text!r} requested, but only {torch.cuda.device_count()} CUDA devices exist"
        )
    return device


def _tensor(array: Array, device: torch.device) -> torch.Tensor:
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def _array(value: Any) -> Array:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
