"""A predictor run in the server's own process (``isolation = "none"``, the default)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from multiserve.types import Array, ModelMetadata, Models, PayloadRequest, Reply
from multiserve_python import contract

NO_TENSORS = ModelMetadata(inputs=(), outputs=())


class InProcessModel:
    """`multiserve.types.PayloadModel` over a predictor constructed in this process."""

    def __init__(self, predictor: contract.Predictor, memory_bytes: int) -> None:
        self.metadata = NO_TENSORS
        self.memory_bytes = memory_bytes
        self._predictor = predictor

    def answer(self, request: PayloadRequest) -> Reply:
        return self._predictor.predict(request)

    def describe(self) -> Mapping[str, Any]:
        return {"predictor": {"class": self._predictor.class_name, "isolation": "none"}}

    def close(self) -> None:
        self._predictor.close()


class BatchingInProcessModel(InProcessModel):
    """A predictor with ``predict_batch``: requests waiting together go to it at once."""

    def answer_batch(self, requests: Sequence[PayloadRequest]) -> list[Reply]:
        return self._predictor.predict_batch(requests)


class AsyncInProcessModel(InProcessModel):
    """A predictor whose ``predict`` is ``async def``: awaited on the server's event loop."""

    async def answer_async(self, request: PayloadRequest) -> Reply:
        return await self._predictor.predict_async(request)

    def answer(self, request: PayloadRequest) -> Reply:
        # The warm-up's call, in a worker thread: on a loop of its own.
        return asyncio.run(self._predictor.predict_async(request))


class PipelineModels:
    """The `models` handle a predictor's ``__init__`` receives. Calls wait until the predictor
    is constructed: the server is still loading it then, and a call could need the server to
    load the model it calls. ``warmup.json`` runs a request through the pipeline before the
    version serves."""

    def __init__(self, models: Models) -> None:
        self._models = models
        self._constructed = False

    def predict(self, name: str, version: str | int, inputs: Any) -> dict[str, Array]:
        self._check()
        return self._models.predict(name, version, inputs)

    async def predict_async(self, name: str, version: str | int, inputs: Any) -> dict[str, Array]:
        self._check()
        return await self._models.predict_async(name, version, inputs)

    def _check(self) -> None:
        if not self._constructed:
            raise RuntimeError(
                "models.predict cannot be called from __init__; call it from predict "
                "(a warmup.json in the version directory runs one request through it before "
                "the version serves)"
            )


def load(
    version_dir: Path,
    config: Mapping[str, Any],
    class_name: str | None,
    models: Models | None,
    label: str,
) -> InProcessModel:
    """Construct the predictor here. Its cost is what this process grew by while its module
    was imported and its ``__init__`` ran."""
    handle = PipelineModels(models) if models is not None else None
    before = contract.rss_bytes()
    predictor = contract.load(version_dir, config, class_name, handle, label)
    after = contract.rss_bytes()
    if handle is not None:
        handle._constructed = True
    grown = max(after - before, 0) if before is not None and after is not None else 0
    if predictor.is_async:
        return AsyncInProcessModel(predictor, grown)
    if predictor.batches:
        return BatchingInProcessModel(predictor, grown)
    return InProcessModel(predictor, grown)
