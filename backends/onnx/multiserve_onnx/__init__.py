"""ONNX Runtime backend for multiserve: serves ``model.onnx``.

Options (a model's config.toml):

- ``device``: ``cpu``, ``cuda`` or ``cuda:N`` (CUDA needs the ``onnxruntime-gpu`` build).
- ``intra_op_threads`` / ``inter_op_threads``: ONNX Runtime thread pools; 0 lets it choose.
- ``optimization``: graph optimisation level, ``disable``, ``basic``, ``extended`` or ``all``.
- ``session_cache``: keep the graph ONNX Runtime optimised for this version (in the server's
  load cache, keyed by the files, options, runtime and machine) and load that, unoptimised,
  next time: a reload after an eviction skips graph optimisation. Unset, versions of up to
  2 MiB are cached: ``benchmarks/load_cache.py`` measured reloads 1.3-2.2x faster there, and no
  gain from 3 MB up, where the first load's extra session (1.5-3x its time) is never paid back.
  ``true`` caches any version up to 1.5 GiB, ``false`` none.

Derives (``optimize`` in config.toml, see ``multiserve.optimize``): ``graph``, the graph
ONNX Runtime optimised, saved so that loads skip optimising it; ``int8``, dynamic int8
quantisation of the MatMul/Gemm weights (needs the ``int8`` extra: the onnx package).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from multiserve.types import Array, LoadContext, ModelMetadata, TensorSpec

logger = logging.getLogger("multiserve.onnx")

ARTIFACT = "model.onnx"
OPTIONS = frozenset(
    {"device", "intra_op_threads", "inter_op_threads", "optimization", "session_cache"}
)
# Past this, protobuf cannot hold the saved graph inline: such versions are not cached.
CACHED_BYTES = 1536 * 1024**2
# Without session_cache in config.toml, only versions up to this size are cached (see above).
AUTO_CACHED_BYTES = 2 * 1024**2

_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
    "tensor(string)": "string",
}
_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
# The smallest model there is: y = Identity(x), x float32 [1] (ONNX IR 8, opset 17).
_IDENTITY = (
    b'\x08\x08\x12\x00:7\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x01sZ\x0f\n\x01x\x12\n\n\x08\x08'
    b"\x01\x12\x04\n\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\x11"
)


class OnnxBackend:
    name = "onnx"
    derivations = frozenset({"graph", "int8"})
    caches_loads = True

    def start(self) -> None:
        """Run one tiny session, once: onnxruntime's first session sets up process-wide state
        (its environment, kernel registries, allocators; about 10 MB) that would otherwise be
        counted in the memory cost of whichever model loads first, and slow its first load."""
        session = ort.InferenceSession(_IDENTITY, providers=["CPUExecutionProvider"])
        session.run(None, {"x": np.zeros(1, dtype=np.float32)})

    def can_load(self, version_dir: Path) -> bool:
        return (version_dir / ARTIFACT).is_file()

    def load(
        self, version_dir: Path, options: Mapping[str, Any], context: LoadContext | None = None
    ) -> OnnxModel:
        unknown = sorted(set(options) - OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown onnx option {', '.join(unknown)}; known: {', '.join(sorted(OPTIONS))}"
            )
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = _threads(options, "intra_op_threads")
        session_options.inter_op_num_threads = _threads(options, "inter_op_threads")
        level = str(options.get("optimization", "all"))
        if level not in _OPTIMIZATION:
            raise ValueError(
                f"optimization must be one of {', '.join(_OPTIMIZATION)}, not {level!r}"
            )
        session_options.graph_optimization_level = _OPTIMIZATION[level]
        cache = options.get("session_cache")
        if not isinstance(cache, bool | None):
            raise ValueError(f"session_cache must be true or false, not {cache!r}")
        # The weights dominate a session's memory: the model file plus any external data files.
        memory = sum(p.stat().st_size for p in version_dir.iterdir() if p.is_file())
        if cache is None:
            cache = memory <= AUTO_CACHED_BYTES
        device = str(options.get("device", "cpu"))
        providers = _providers(device)
        source, cached = version_dir / ARTIFACT, "off"
        if cache and level != "disable" and context is not None and context.load_cache:
            saved = context.load_cache / ARTIFACT
            if context.load_cache_hit and saved.is_file():
                source, cached = saved, "hit"
            elif not context.load_cache_hit and memory <= CACHED_BYTES:
                try:
                    _save_optimized(source, saved, session_options, providers)
                    source, cached = saved, "saved"
                except Exception as exc:  # a full disk: serve it, optimised as it loads
                    saved.unlink(missing_ok=True)
                    logger.warning("could not save the optimised graph of %s: %s", source, exc)
            if cached != "off":  # the saved graph is optimised already
                session_options.graph_optimization_level = _OPTIMIZATION["disable"]
        session = ort.InferenceSession(
            str(source), sess_options=session_options, providers=providers
        )
        if device != "cpu" and "CUDAExecutionProvider" not in session.get_providers():
            raise RuntimeError(
                f"device {device!r}: onnxruntime could not start its CUDA execution provider "
                "(are the CUDA and cuDNN libraries installed?)"
            )
        metadata = ModelMetadata(
            inputs=tuple(_spec(arg, "input") for arg in session.get_inputs()),
            outputs=tuple(_spec(arg, "output") for arg in session.get_outputs()),
        )
        return OnnxModel(session, metadata, memory, cached)

    def derive(
        self, kind: str, version_dir: Path, options: Mapping[str, Any], out_dir: Path
    ) -> dict[str, Any]:
        from multiserve_onnx.derive import derive

        providers = _providers(str(options.get("device", "cpu")))
        return derive(kind, version_dir, options, out_dir, providers)


class OnnxModel:
    def __init__(
        self,
        session: ort.InferenceSession,
        metadata: ModelMetadata,
        memory_bytes: int,
        session_cache: str = "off",
    ) -> None:
        self._session: ort.InferenceSession | None = session
        # "hit": loaded from the optimised graph an earlier load saved; "saved": optimised
        # and saved by this load; "off": not cached.
        self.session_cache = session_cache
        self.metadata = metadata
        self.memory_bytes = memory_bytes
        self._output_names = [spec.name for spec in metadata.outputs]

    def predict(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        session = self._session
        if session is None:
            raise RuntimeError("the model is closed")
        results = session.run(self._output_names, dict(inputs))
        return dict(zip(self._output_names, results, strict=True))

    def describe(self) -> dict[str, Any]:
        return {"session_cache": self.session_cache}

    def close(self) -> None:
        self._session = None


def _save_optimized(
    source: Path, target: Path, serving: ort.SessionOptions, providers: list[Any]
) -> None:
    """Optimise ``source`` as ``serving`` would and save the result to ``target``, in a session
    of its own that is dropped at once: a session that saved its graph keeps a second copy of
    the weights for as long as it lives (a 25 MB model then cost 50 MB)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = serving.graph_optimization_level
    options.intra_op_num_threads = serving.intra_op_num_threads
    options.optimized_model_filepath = str(target)
    # Its one warning says the graph suits this machine's CPU: the cache's key names the CPU.
    options.log_severity_level = 3
    ort.InferenceSession(str(source), sess_options=options, providers=providers)


def _providers(device: str) -> list[Any]:
    match = _DEVICE.match(device)
    if match is None:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', not {device!r}")
    if match.group(1) == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(
            f"device {device!r} requested, but this onnxruntime has no CUDA execution provider "
            f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu"
        )
    return [
        ("CUDAExecutionProvider", {"device_id": int(match.group(2) or 0)}),
        "CPUExecutionProvider",
    ]


def _threads(options: Mapping[str, Any], key: str) -> int:
    value = options.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be an integer >= 0, not {value!r}")
    return value


def _spec(arg: Any, what: str) -> TensorSpec:
    dtype = _DTYPES.get(arg.type)
    if dtype is None:
        raise ValueError(
            f"{what} {arg.name!r} has type {arg.type}, which multiserve cannot serve "
            "(for scikit-learn classifiers, convert with zipmap=False)"
        )
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
    return TensorSpec(name=arg.name, dtype=dtype, shape=shape)
