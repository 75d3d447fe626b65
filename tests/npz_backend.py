"""A third-party backend, written the way an outside package would write one: it serves
``model.npz`` (a weight matrix) as ``y = x @ weights``. Tests register it through a
`BackendRegistry` entry point, which also exercises the plug-in path.

Options: ``load_delay_s``, ``predict_delay_s`` and ``close_delay_s`` make loads, predictions
and closes slow, to widen race windows; predicting on an input that contains NaN raises, like
a model bug would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np

from multiserve.types import Array, ModelMetadata, TensorSpec

ENTRY_POINT = EntryPoint(
    name="npz", value="tests.npz_backend:NpzBackend", group="multiserve.backends"
)


def write_npz_model(version_dir: Path, weights: Array) -> Path:
    version_dir.mkdir(parents=True, exist_ok=True)
    path = version_dir / "model.npz"
    np.savez(path, weights=weights.astype(np.float32))
    return path


class NpzBackend:
    name = "npz"
    loads = 0
    _lock = threading.Lock()

    def can_load(self, version_dir: Path) -> bool:
        return (version_dir / "model.npz").is_file()

    def load(self, version_dir: Path, options: Mapping[str, Any]) -> NpzModel:
        with NpzBackend._lock:
            NpzBackend.loads += 1
        time.sleep(float(options.get("load_delay_s", 0)))
        with np.load(version_dir / "model.npz") as data:
            weights = data["weights"]
        return NpzModel(
            weights,
            float(options.get("predict_delay_s", 0)),
            float(options.get("close_delay_s", 0)),
        )


class NpzModel:
    def __init__(self, weights: Array, predict_delay_s: float, close_delay_s: float = 0) -> None:
        self.weights = weights
        self.predict_delay_s = predict_delay_s
        self.close_delay_s = close_delay_s
        rows, cols = weights.shape
        self.metadata = ModelMetadata(
            inputs=(TensorSpec("x", "float32", (-1, rows)),),
            outputs=(TensorSpec("y", "float32", (-1, cols)),),
        )
        self.memory_bytes = weights.nbytes
        self.closed = False

    def predict(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        x = inputs["x"]
        if np.isnan(x).any():
            raise FloatingPointError("input contains NaN")
        time.sleep(self.predict_delay_s)
        return {"y": x @ self.weights}

    def close(self) -> None:
        time.sleep(self.close_delay_s)
        self.closed = True
