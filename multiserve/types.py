"""The contract between the core and its backends.

A backend distribution depends on this module and nothing else in the core. It exposes a class
implementing `Backend` through the ``multiserve.backends`` entry-point group; the core
instantiates it with no arguments the first time a model needs it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[Any]

# dtype names a TensorSpec may carry: numpy's names, plus "string" for text tensors.
DTYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "string",
    }
)

NUMPY_DTYPES = {name: np.dtype(np.str_) if name == "string" else np.dtype(name) for name in DTYPES}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One input or output of a model. ``-1`` in ``shape`` marks a dynamic dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(
                f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {sorted(DTYPES)}"
            )
        if any(dim < -1 for dim in self.shape):
            raise ValueError(f"tensor {self.name!r}: dims must be >= 0, or -1 for dynamic")

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return NUMPY_DTYPES[self.dtype]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
        }


def specs_from_config(entries: Any, what: str) -> tuple[TensorSpec, ...]:
    """Parse ``[[inputs]]`` / ``[[outputs]]`` tables from a model's config.toml."""
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"config key {what!r} must be a non-empty array of tables")
    specs = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"each entry of {what!r} needs a string 'name'")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{what} {entry['name']!r}: 'shape' must be a list of integers")
        specs.append(
            TensorSpec(
                name=entry["name"], dtype=str(entry.get("dtype", "float32")), shape=tuple(shape)
            )
        )
    return tuple(specs)


@runtime_checkable
class LoadedModel(Protocol):
    """A model ready to serve. ``predict`` may be called from several threads at once."""

    metadata: ModelMetadata
    memory_bytes: int

    def predict(self, inputs: Mapping[str, Array]) -> Mapping[str, Array]: ...

    def close(self) -> None:
        """Release the model's memory. Called exactly once, after the last ``predict``."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def can_load(self, version_dir: Path) -> bool: ...

    def load(self, version_dir: Path, options: Mapping[str, Any]) -> LoadedModel:
        """Load the version in ``version_dir``. ``options`` is the merged config.toml.

        Raise any exception with a message meant for the operator; the core records it as
        the version's load error.
        """
        ...


@runtime_checkable
class Deriver(Protocol):
    """Optional, beside `Backend`: a backend that derives a faster artifact from a version it
    loads (``optimize`` / ``export`` in a model's config.toml). The core calls it in a child
    process, checks what it wrote against the original, and caches it (`multiserve.optimize`).
    """

    derivations: frozenset[str]  # the kinds it can derive, e.g. {"graph", "int8"}

    def derive(
        self, kind: str, version_dir: Path, options: Mapping[str, Any], out_dir: Path
    ) -> dict[str, Any]:
        """Write the derived version of ``version_dir`` into ``out_dir`` (an empty directory):
        an artifact that some installed backend loads, and any file it needs. ``options`` are
        the version's backend options. Returns the options to load the derived version with
        (they go into its config.toml). Raise with a message meant for the operator when the
        version cannot be derived."""
        ...
