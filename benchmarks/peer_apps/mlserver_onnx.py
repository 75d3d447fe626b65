"""A minimal MLServer runtime that serves one ONNX model with onnxruntime: the peer that
``benchmarks/run.py`` compares multiserve with. Copied into the MLServer model repository as
``onnx_runtime.py`` and named in ``model-settings.json`` as ``onnx_runtime.OnnxRuntime``; it runs
in MLServer's own virtualenv, not in multiserve's.

It is written the way MLServer's own runtimes are (``mlserver-sklearn``): decode the V2 input
with ``NumpyCodec``, run the model in ``predict``, encode the output with ``NumpyCodec``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel  # type: ignore[import-not-found, unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found, unused-ignore]
from mlserver.types import (  # type: ignore[import-not-found, unused-ignore]
    InferenceRequest,
    InferenceResponse,
)
from mlserver.utils import get_model_uri  # type: ignore[import-not-found, unused-ignore]


class OnnxRuntime(MLModel):  # type: ignore[misc, unused-ignore]
    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: Any) -> Any:
        array = self.decode(payload.inputs[0], default_codec=NumpyCodec)
        results = self._session.run(None, {self._input: np.asarray(array, dtype=np.float32)})
        return InferenceResponse(
            model_name=self.name,
            outputs=[
                NumpyCodec.encode_output(name, result)
                for name, result in zip(self._outputs, results, strict=True)
            ],
        )


__all__ = ["InferenceRequest", "OnnxRuntime"]
