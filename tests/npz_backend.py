"""A third-party backend, written the way an outside package would write one: it serves
``model.npz`` (a weight matrix) as ``y = x @ weights``. Tests register it through a
`BackendRegistry` entry point, which also exercises the plug-in path.

Options: ``load_delay_s``, ``predict_delay_s`` and ``close_delay_s`` make loads, predictions
and closes slow, to widen race windows; predicting on an input that contains NaN raises, like
a model bug would.

It behaves like a real runtime where a test of the server relies on it:

- a closed model refuses to predict, also when it is closed while a prediction runs (a real
  runtime's session is freed under it), so a close that does not wait for a request to drain
  fails that request;
- ``allocate_bytes`` makes the model hold that much extra memory (touched, so resident) that
  its ``memory_bytes`` does not count, as runtimes allocate well beyond their weights;
- ``journal`` names a file the model appends one line to per event (``load``, ``predict
  <x[0, 0]>``, with `` rows=N`` for a call of more than one row, ``close``), so a test can
  see from outside what ran, and in which order;
- ``load_gate`` names a file the load waits for (at most 60 s), so a test holds a load open
  for as long as it needs, without guessing a delay.
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
        gate = options.get("load_gate")
        if gate:
            deadline = time.monotonic() + 60
            while not Path(str(gate)).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        with np.load(version_dir / "model.npz") as data:
            weights = data["weights"]
        journal = options.get("journal")
        return NpzModel(
            weights,
            float(options.get("predict_delay_s", 0)),
            float(options.get("close_delay_s", 0)),
            allocate_bytes=int(options.get("allocate_bytes", 0)),
            journal=Path(str(journal)) if journal else None,
        )


class ClosedModelError(RuntimeError):
    """What a real runtime's freed session would do, short of crashing the process."""


class NpzModel:
    def __init__(
        self,
        weights: Array,
        predict_delay_s: float,
        close_delay_s: float = 0,
        *,
        allocate_bytes: int = 0,
        journal: Path | None = None,
    ) -> None:
        self.weights = weights
        self.journal = journal
        # Resident, not just reserved: ones, not zeros (calloc'd zeros are not touched).
        self.extra: Array | None = np.ones(allocate_bytes, np.uint8) if allocate_bytes else None
        self._record("load")
        self.predict_delay_s = predict_delay_s
        self.close_delay_s = close_delay_s
        rows, cols = weights.shape
        self.metadata = ModelMetadata(
            inputs=(TensorSpec("x", "float32", (-1, rows)),),
            outputs=(TensorSpec("y", "float32", (-1, cols)),),
        )
        self.memory_bytes = weights.nbytes
        self.closed = False

    def _record(self, event: str) -> None:
        if self.journal is not None:
            with self.journal.open("a") as stream:
                stream.write(event + "\n")

    def predict(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        x = inputs["x"]
        if self.closed:
            raise ClosedModelError("predict on a closed model")
        rows = f" rows={len(x)}" if x.ndim and len(x) > 1 else ""
        self._record(f"predict {float(x.reshape(-1)[0]) if x.size else 'empty'}{rows}")
        if np.isnan(x).any():
            raise FloatingPointError("input contains NaN")
        time.sleep(self.predict_delay_s)
        if self.closed:
            raise ClosedModelError("the model was closed while it predicted")
        return {"y": x @ self.weights}

    def close(self) -> None:
        time.sleep(self.close_delay_s)
        self.closed = True
        self.extra = None
        self._record("close")
