"""An iris classifier as a Python predictor: named raw measurements in, class labels with
probabilities out. ``examples/make_models.py`` copies this file to ``iris/1/predictor.py``.

A pipeline: it scales the features (the means and deviations are in ``scaling.json`` beside
it), runs them through the ``mlp`` model of the same server (an ONNX model, loaded, batched
and counted like any request for it), and names the most probable class.

    curl -s -X POST localhost:8000/models/iris/predict -H 'Content-Type: application/json' \\
         -d '{"rows": [{"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4,
                        "petal_width": 0.2}]}'
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from multiserve_python import Response

from multiserve.types import Models

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
CLASSES = ("setosa", "versicolor", "virginica")


class Predictor:
    def __init__(self, model_dir: Path, config: dict[str, Any], models: Models) -> None:
        scaling = json.loads((model_dir / "scaling.json").read_text())
        self.mean = np.array([scaling["mean"][f] for f in FEATURES], dtype=np.float32)
        self.std = np.array([scaling["std"][f] for f in FEATURES], dtype=np.float32)
        self.classifier = str(config.get("classifier", "mlp"))
        self.classifier_version = str(config.get("classifier_version", "latest"))
        self.models = models

    def predict(self, payload: Any) -> Any:
        rows = payload.get("rows") if isinstance(payload, dict) else None
        if not isinstance(rows, list) or not rows:
            return Response({"error": 'send {"rows": [{"sepal_length": ..., ...}, ...]}'}, 400)
        try:
            x = np.array([[float(row[f]) for f in FEATURES] for row in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError):
            return Response({"error": f"each row needs {', '.join(FEATURES)}, as numbers"}, 400)
        outputs = self.models.predict(
            self.classifier, self.classifier_version, (x - self.mean) / self.std
        )
        probabilities = outputs["probabilities"]
        return {
            "predictions": [
                {
                    "label": CLASSES[int(np.argmax(row))],
                    "probabilities": dict(
                        zip(CLASSES, row.astype(np.float64).round(4).tolist(), strict=True)
                    ),
                }
                for row in probabilities
            ],
            "classifier": self.classifier,
        }
