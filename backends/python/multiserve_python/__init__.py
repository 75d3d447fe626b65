"""Python predictor backend for multiserve: a version directory holding ``predictor.py`` is a
model, and the model is just a Python class.

    # models/sentiment/1/predictor.py
    class Predictor:
        def __init__(self, model_dir, config):       # any of model_dir, config, models
            self.words = (model_dir / "words.txt").read_text().split()

        def predict(self, payload, query_params, headers):  # query_params, headers optional
            return {"positive": sum(w in self.words for w in payload["text"].split())}

``predict`` gets the decoded JSON body for a JSON request and the raw bytes otherwise; it
returns anything JSON-serialisable (numpy included), ``bytes``, or a `Response`. Optional:
``close()``, ``predict_batch(payloads)`` (used when the model's ``max_batch_size`` > 1), an
``async def predict`` (awaited on the server's event loop: it must not block).

Options (the version's config.toml; every key, these included, is also in the ``config`` dict
``__init__`` gets):

- ``predictor_class``: the class to construct (default ``Predictor``, else Cortex's
  ``PythonPredictor``).
- ``isolation``: ``"none"`` (in the server's process) or ``"process"`` (a child process of its
  own); defaults to the server's ``predictor_isolation`` setting.
- With ``isolation = "process"``: ``memory_limit`` (bytes or "512MiB": the child's data
  segment; 0, the default, for none), ``timeout_s`` (60: an answer that takes longer kills
  the child) and ``start_timeout_s`` (300: for the import and ``__init__``).

Loading one runs code from the model repository, so the server refuses these versions unless
its operator allows them (``allow_python_predictors``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from multiserve.types import LoadContext, PayloadModel
from multiserve_python.contract import PREDICTOR_FILE
from multiserve_python.response import Response

__all__ = ["PythonBackend", "Response"]

ISOLATIONS = ("none", "process")
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_START_TIMEOUT_S = 300.0
_PROCESS_ONLY = ("memory_limit", "timeout_s", "start_timeout_s")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


class PythonBackend:
    name = "python"
    # Loading a version imports and runs its predictor.py: the server asks its operator first.
    executes_repository_code = True
    # Its models take whole requests (PayloadModel), in any content type.
    answers_payloads = True

    def can_load(self, version_dir: Path) -> bool:
        return (version_dir / PREDICTOR_FILE).is_file()

    def load(
        self, version_dir: Path, options: Mapping[str, Any], context: LoadContext | None = None
    ) -> PayloadModel:
        context = context or LoadContext()
        label = f"{context.name} version {context.version}" if context.name else str(version_dir)
        class_name = options.get("predictor_class")
        if class_name is not None and (not isinstance(class_name, str) or not class_name):
            raise ValueError(f"predictor_class must be a class name, not {class_name!r}")
        isolation = options.get("isolation", context.settings.get("predictor_isolation", "none"))
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be 'none' or 'process', not {isolation!r}")
        if isolation == "none":
            given = [key for key in _PROCESS_ONLY if key in options]
            if given:
                raise ValueError(
                    f'{", ".join(given)} applies to isolation = "process" only; this '
                    "predictor runs in the server's process"
                )
            from multiserve_python import inprocess

            return inprocess.load(version_dir, options, class_name, context.models, label)
        from multiserve_python import isolated

        spec = isolated.ChildSpec(
            version_dir=version_dir,
            config=options,
            class_name=class_name,
            label=label,
            memory_limit=_size(options.get("memory_limit", 0), "memory_limit"),
            timeout_s=_seconds(options.get("timeout_s", DEFAULT_TIMEOUT_S), "timeout_s"),
            start_timeout_s=_seconds(
                options.get("start_timeout_s", DEFAULT_START_TIMEOUT_S), "start_timeout_s"
            ),
        )
        return isolated.load(spec)


def _size(value: object, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{key} must be a size such as 536870912 or '512MiB', not {value!r}")
    number, unit = match.groups()
    return int(float(number) * _UNITS[(unit or "b").lower()])


def _seconds(value: object, key: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ValueError(f"{key} must be a number of seconds > 0, not {value!r}")
