"""The contract between the core and its backends.

A backend distribution depends on this module and nothing else in the core. It exposes a class
implementing `Backend` through the ``multiserve.backends`` entry-point group; the core
instantiates it with no arguments the first time a model needs it.

A loaded model is one of two kinds:

- a `LoadedModel` takes named tensors and returns named tensors: the core decodes each request
  (JSON, ``.npy``, V2) into numpy, checks it against the model's metadata, and encodes the
  outputs;
- a `PayloadModel` takes the request itself (`PayloadRequest`: the body, its content type, the
  query parameters and headers) and returns the answer (`Reply`): the core passes the body
  through undecoded (JSON is decoded on first use of `PayloadRequest.payload`) and sends the
  reply as it is. Python predictors are payload models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import orjson

# Exceptions a model may raise to choose its answer's status (each carries its HTTP status).
from multiserve.errors import (
    MalformedRequest as MalformedRequest,
)
from multiserve.errors import (
    ModelLoadFailed as ModelLoadFailed,
)
from multiserve.errors import (
    ModelUnavailable as ModelUnavailable,
)
from multiserve.errors import (
    MultiserveError as MultiserveError,
)
from multiserve.errors import (
    PredictionFailed as PredictionFailed,
)

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

    def load(self, version_dir: Path, options: Mapping[str, Any]) -> Model:
        """Load the version in ``version_dir``. ``options`` is the merged config.toml.

        A ``load`` that declares a third parameter named ``context`` also gets a `LoadContext`
        (the model's name and version, the server's other models, its settings).

        Raise any exception with a message meant for the operator; the core records it as
        the version's load error.
        """
        ...


# Optional class attributes of a `Backend`:
# - ``executes_repository_code = True``: loading runs code found in the model repository. The
#   server then refuses such versions (state failed, with the reason) unless the operator
#   allows it.
# - ``caches_loads = True``: its ``load`` keeps what makes a later load of the same files faster
#   in ``context.load_cache`` (see `LoadContext`); the core keys, bounds and shares that cache.
# - ``answers_payloads = True``: its models are `PayloadModel`s. Requests in any content type
#   then reach a model that is not loaded yet (a tensor model's answer 415 at once).


# --- payload models -------------------------------------------------------------------------

_NO_PARAMS: Mapping[str, str] = MappingProxyType({})
JSON_TYPES = frozenset({"", "application/json"})


class PayloadRequest:
    """One request as a `PayloadModel` receives it. Read-only.

    ``content_type`` is the media type alone, lower case ("" when the request named none);
    ``query_params`` keeps the last value of a repeated key; ``headers`` has lower-case names,
    a repeated header's values joined with ", ".
    """

    __slots__ = ("_payload", "body", "content_type", "headers", "query_params")

    def __init__(
        self,
        body: bytes,
        content_type: str = "",
        query_params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.body = body
        self.content_type = content_type
        self.query_params = _NO_PARAMS if query_params is None else query_params
        self.headers = _NO_PARAMS if headers is None else headers
        self._payload: Any = _UNDECODED

    @property
    def is_json(self) -> bool:
        """The body is JSON: ``application/json``, a ``+json`` type, or no content type."""
        return self.content_type in JSON_TYPES or self.content_type.endswith("+json")

    @property
    def payload(self) -> Any:
        """The decoded JSON body for a JSON request (`MalformedRequest` if it is not valid
        JSON), else the raw bytes. Decoded once, on first use."""
        if self._payload is _UNDECODED:
            if not self.is_json:
                self._payload = self.body
            else:
                try:
                    self._payload = orjson.loads(self.body)
                except orjson.JSONDecodeError as exc:
                    raise MalformedRequest(f"request body is not valid JSON: {exc}") from None
        return self._payload


_UNDECODED = object()


@dataclass(frozen=True, slots=True)
class Reply:
    """A payload model's answer, sent as it is (the core adds the model's name and version
    headers)."""

    body: bytes
    status: int = 200
    media_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@runtime_checkable
class PayloadModel(Protocol):
    """A model that answers requests rather than tensors.

    ``answer`` is called in the model's worker thread(s), as ``LoadedModel.predict`` is. Raise
    to fail the request: `PredictionFailed` (500) with a message for the client, or any other
    exception (500, its type and message shown); `ModelUnavailable` (503) when the model cannot
    answer now. The request fails alone and the model keeps serving. ``metadata`` may declare
    no inputs or outputs.
    """

    metadata: ModelMetadata
    memory_bytes: int

    def answer(self, request: PayloadRequest) -> Reply: ...

    def close(self) -> None:
        """Release the model's memory. Called exactly once, after the last ``answer``."""


@runtime_checkable
class BatchingPayloadModel(PayloadModel, Protocol):
    """A payload model that answers several requests in one call. With ``max_batch_size`` > 1,
    requests waiting together (up to that many) go to ``answer_batch``, which returns one
    reply per request, in order; a call that raises is retried one request at a time, so a
    bad request fails alone."""

    def answer_batch(self, requests: Sequence[PayloadRequest]) -> Sequence[Reply]: ...


@runtime_checkable
class AsyncPayloadModel(PayloadModel, Protocol):
    """A payload model answered on the event loop: ``answer_async`` must never block (no
    blocking I/O, no long computation). ``answer`` is still used for the warm-up, in a worker
    thread."""

    async def answer_async(self, request: PayloadRequest) -> Reply: ...


Model = LoadedModel | PayloadModel


@runtime_checkable
class Describable(Protocol):
    """Optional for any model: facts it adds to its version's entry in ``GET /models`` (JSON
    values). Called on the event loop, so it must answer at once."""

    def describe(self) -> Mapping[str, Any]: ...


# --- what a load is given -------------------------------------------------------------------


class Models(Protocol):
    """The other models of the same server, for a model that calls them (a pipeline). Each
    call goes through the server's lifecycle: lazy load, LRU, leases, metrics. ``version`` is
    a number, ``"latest"`` or a label; ``inputs`` maps input names to arrays (or is one array
    for a single-input model). Errors are the server's (`multiserve.errors`): e.g.
    ``ModelNotFound`` for a model that does not exist."""

    def predict(self, name: str, version: str | int, inputs: Any) -> dict[str, Array]:
        """Blocking: call it from a worker thread (a predictor's ``predict``), never from the
        event loop."""
        ...

    async def predict_async(self, name: str, version: str | int, inputs: Any) -> dict[str, Array]:
        """For code on the event loop (an ``async def predict``)."""
        ...


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What the server offers a load beyond the version's files and options. A backend's
    ``load`` receives it when it declares a parameter named ``context``."""

    name: str = ""  # the model's name and version, for messages
    version: int = 0
    models: Models | None = None  # None where no server runs (a model loaded on its own)
    # The server's settings (`multiserve.settings.Settings` fields, the admin token left out),
    # for server-wide defaults of a backend's options.
    settings: Mapping[str, Any] = field(default_factory=dict)
    # For a backend with ``caches_loads = True``: a directory of its own, keyed by the content
    # of the version's files, its options, the runtimes' versions and the machine, where it may
    # keep what makes a later load of the same files faster (ONNX: the optimised graph). When
    # ``load_cache_hit``, an earlier load filled it and it is read-only; otherwise it is empty,
    # and what the load writes there is kept (if the load succeeds) for the next one. None:
    # no such directory (the backend, or the server, does not cache).
    load_cache: Path | None = None
    load_cache_hit: bool = False


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
