"""``export = "onnx"``: a torch version exported to ONNX for ``multiserve.optimize``, served
by the onnx backend, with the same tensor names as the torch model."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from multiserve.types import ModelMetadata

ARTIFACT = "model.onnx"
# Protobuf cannot hold a model over 2 GiB: larger ones keep their weights in a file beside it.
EXTERNAL_DATA_BYTES = 1536 * 1024**2
# The size a dynamic dimension gets in the inputs a TorchScript model is traced with.
_EXAMPLE_DIM = 2


def export_onnx(
    program: torch.export.ExportedProgram | None,
    module: torch.nn.Module,
    metadata: ModelMetadata,
    options: Mapping[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Export ``program`` (a ``torch.export`` model) or ``module`` (TorchScript) into
    ``out_dir``; the options for the onnx backend to load it with."""
    target = out_dir / ARTIFACT
    input_names = [spec.name for spec in metadata.inputs]
    output_names = [spec.name for spec in metadata.outputs]
    parameters = [*module.parameters(), *module.buffers()]
    large = sum(t.numel() * t.element_size() for t in parameters) > EXTERNAL_DATA_BYTES
    with _quiet():
        if program is not None:
            _require_onnxscript()
            torch.onnx.export(
                program,
                (),
                str(target),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                external_data=large,
                optimize=True,
                verbose=False,
            )
        else:
            # TorchScript is exported by tracing its graph (torch's TorchScript exporter):
            # torch.export cannot take a scripted module.
            examples = tuple(
                torch.zeros(
                    [dim if dim >= 0 else _EXAMPLE_DIM for dim in spec.shape],
                    dtype=getattr(torch, spec.dtype),
                )
                for spec in metadata.inputs
            )
            dynamic_axes = {
                spec.name: [axis for axis, dim in enumerate(spec.shape) if dim < 0]
                for spec in (*metadata.inputs, *metadata.outputs)
                if any(dim < 0 for dim in spec.shape)
            }
            torch.onnx.export(
                module,
                examples,
                str(target),
                dynamo=False,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                external_data=large,
            )
    return {"device": options["device"]} if "device" in options else {}


def _require_onnxscript() -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"exporting a torch.export model to ONNX needs onnxscript ({exc}): "
            "pip install 'multiserve-torch[onnx]'"
        ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress, log what they skip (torchvision's operators) and warn
    about deprecations: none of it is for the operator, whose answer is the check's verdict."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)
