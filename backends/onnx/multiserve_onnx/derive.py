"""Derived ONNX models for ``multiserve.optimize``: ONNX Runtime's offline graph optimisation
(``optimize = "graph"``) and dynamic int8 quantisation of the MatMul/Gemm weights
(``optimize = "int8"``)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnxruntime as ort

ARTIFACT = "model.onnx"
# Protobuf cannot hold a model over 2 GiB: larger ones keep their weights in a file beside it.
EXTERNAL_DATA_BYTES = 1536 * 1024**2
# What a derived model keeps from the original's options; the rest are the backend's choices.
KEPT_OPTIONS = ("device", "intra_op_threads", "inter_op_threads")


def derive(
    kind: str,
    version_dir: Path,
    options: Mapping[str, Any],
    out_dir: Path,
    providers: list[Any],
) -> dict[str, Any]:
    source, target = version_dir / ARTIFACT, out_dir / ARTIFACT
    large = (
        sum(p.stat().st_size for p in version_dir.iterdir() if p.is_file()) > EXTERNAL_DATA_BYTES
    )
    if kind == "graph":
        optimize_graph(source, target, providers, large)
    elif kind == "int8":
        quantize_int8(source, target, providers, large)
    else:
        raise ValueError(f"the onnx backend derives graph and int8, not {kind!r}")
    kept = {key: options[key] for key in KEPT_OPTIONS if key in options}
    # The saved graph is optimised already: loading it again skips that work.
    return {**kept, "optimization": "disable"}


def optimize_graph(
    source: Path,
    target: Path,
    providers: list[Any],
    large: bool,
    level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> None:
    """Save the graph ONNX Runtime runs after its optimisations at ``level`` (all of them by
    default, including layouts for this machine's CPU: the result is for machines like it)."""
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = level
    session_options.optimized_model_filepath = str(target)
    # Its one warning says that the graph suits this machine's CPU: the cache is keyed by it.
    session_options.log_severity_level = 3
    if large:
        session_options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", target.name + ".data"
        )
        session_options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
    ort.InferenceSession(str(source), sess_options=session_options, providers=providers)


def quantize_int8(source: Path, target: Path, providers: list[Any], large: bool) -> None:
    """Dynamic quantisation: MatMul and Gemm weights stored as int8 (one scale per output
    channel), activations quantised at run time. Before it, the graph optimisations that keep
    to standard operators (the ones the quantiser knows: what its own pre-processing runs,
    without the symbolic shape inference that imports torch); after it, the full set, which
    fuses the quantised graph into ONNX Runtime's integer kernels."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise RuntimeError(
            f"int8 quantisation needs the onnx package ({exc}): pip install 'multiserve-onnx[int8]'"
        ) from None
    root = logging.getLogger()  # the quantiser's advice to pre-process is logged here
    level = root.level
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=target.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quantized = Path(scratch) / "quantized.onnx"
        optimize_graph(
            source, prepared, providers, large, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        )
        root.setLevel(max(level, logging.ERROR))
        try:
            quantize_dynamic(
                prepared,
                quantized,
                op_types_to_quantize=["MatMul", "Gemm"],
                weight_type=QuantType.QInt8,
                per_channel=True,
                use_external_data_format=large,
            )
        finally:
            root.setLevel(level)
        optimize_graph(quantized, target, providers, large)
