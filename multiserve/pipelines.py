"""The `Models` handle: a model that calls the server's other models (a pipeline: a Python
predictor that pre-processes, calls an ONNX model, post-processes).

Each call is a request like any other for the model it calls: it resolves ``latest`` and
labels, loads the model on first use, holds a lease while it runs, takes its turn in the
model's dispatcher (dynamic batching included) and is counted in its inference metrics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from multiserve import codecs
from multiserve.batching import Finish, Inputs, Outputs, Prepare
from multiserve.errors import InvalidInput
from multiserve.types import Array, LoadContext

if TYPE_CHECKING:
    from multiserve.lifecycle import Lifecycle, LoadedEntry
    from multiserve.settings import Settings

logger = logging.getLogger("multiserve.pipelines")


def load_context(lifecycle: Lifecycle, settings: Settings) -> LoadContext:
    """What the server gives each load (call on its event loop): its models, and its settings
    (the admin token left out) for server-wide defaults. Says so in the log when Python
    predictors are allowed, since that lets the repository run code in this process."""
    if settings.allow_python_predictors:
        logger.warning(
            "Python predictors are allowed: code in the model repository runs with this "
            "server's privileges"
        )
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    del fields["admin_token"]
    return LoadContext(models=ServerModels(lifecycle), settings=MappingProxyType(fields))


class ServerModels:
    """The server's models, as `multiserve.types.Models` describes them to a backend."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        """Call on the event loop the lifecycle runs on."""
        self._lifecycle = lifecycle
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def predict(self, name: str, version: str | int, inputs: Any) -> dict[str, Array]:
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError(
                "models.predict blocks, and this is the event loop: in an async def predict, "
                "use `await models.predict_async(...)`"
            )
        future = asyncio.run_coroutine_threadsafe(
            self.predict_async(name, version, inputs), self._loop
        )
        return future.result()

    async def predict_async(self, name: str, version: str | int, inputs: Any) -> dict[str, Array]:
        _, outputs = await self._lifecycle.infer(name, str(version), _prepare(inputs))
        return outputs


def _prepare(inputs: Any) -> Callable[[LoadedEntry], Prepare[Outputs]]:
    """The job for the called model's dispatcher: the inputs checked and cast against its
    metadata (in its worker thread), the outputs returned as they are."""

    def prepare(entry: LoadedEntry) -> Prepare[Outputs]:
        metadata = entry.model.metadata

        def job() -> tuple[Inputs, Finish[Outputs]]:
            named: Mapping[str, object]
            if isinstance(inputs, Mapping):
                named = inputs
            elif len(metadata.inputs) == 1:
                named = {metadata.inputs[0].name: inputs}
            else:
                raise InvalidInput(
                    f"{entry.record.name} has {len(metadata.inputs)} inputs: pass a dict of "
                    "input name to array"
                )
            return codecs.check_inputs(named, metadata), _as_outputs

        return job

    return prepare


def _as_outputs(outputs: Outputs) -> Outputs:
    return {name: np.asarray(value) for name, value in outputs.items()}
