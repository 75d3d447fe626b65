"""Running a payload model's requests (`multiserve.types.PayloadModel`: a Python predictor, or
any backend's model that takes requests rather than tensors).

A payload model gets the same `Dispatcher` machinery as a tensor model: its own worker
thread(s), every waiting request taken per wake-up, results handed back to the event loop a
batch at a time. What differs is the job: a `PayloadJob` carries the request itself, and the
model's `Reply` is the answer. With ``max_batch_size`` > 1 and a model that answers batches,
waiting requests go to it together, as tensors are stacked for a tensor model. A model that
answers on the event loop (`AsyncPayloadModel`) has its requests run there instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from multiserve.batching import FLUSH_S, Dispatcher, Finish, Inputs, Prepare, _Job, _Result
from multiserve.errors import (
    ModelLoadFailed,
    MultiserveError,
    PredictionFailed,
    TensorsNotServed,
)
from multiserve.types import (
    AsyncPayloadModel,
    BatchingPayloadModel,
    PayloadModel,
    PayloadRequest,
    Reply,
)

logger = logging.getLogger("multiserve.payloads")

T = TypeVar("T")
WARMUP_JSON = "warmup.json"


class PayloadJob(Generic[T]):
    """One request for a payload model, and how to turn its reply into the answer (run in the
    worker, like a tensor job's ``finish``).

    It is a `Prepare` only so that it travels the lifecycle's paths unchanged; a tensor model
    never receives one (the HTTP layer checks the model first)."""

    __slots__ = ("finish", "request")

    def __init__(self, request: PayloadRequest, finish: Callable[[Reply], T]) -> None:
        self.request = request
        self.finish = finish

    def __call__(self) -> tuple[Inputs, Finish[T]]:
        raise TensorsNotServed("a request payload cannot be run as tensors")


class PayloadDispatcher(Dispatcher):
    """Runs one payload model's jobs: in its worker threads, or on the event loop for a model
    that answers there. Refuses tensor jobs (`TensorsNotServed`)."""

    def __init__(
        self,
        model_name: str,
        version: int,
        model: PayloadModel,
        inferred: Callable[[float], None],
        *,
        max_batch_size: int = 1,
        threads: int = 1,
    ) -> None:
        super().__init__(
            f"{model_name}-{version}", _no_tensors, max_batch_size=max_batch_size, threads=threads
        )
        self.what = f"{model_name} version {version}"
        self._route = f"/models/{model_name}/{version}/predict"
        self._answer = model.answer
        self._inferred = inferred
        self._batch: Callable[[Sequence[PayloadRequest]], Sequence[Reply]] | None = None
        if max_batch_size > 1 and isinstance(model, BatchingPayloadModel):
            self._batch = model.answer_batch
        self._on_loop: Callable[[PayloadRequest], Awaitable[Reply]] | None = None
        if isinstance(model, AsyncPayloadModel):
            self._on_loop = model.answer_async

    def submit(self, prepare: Prepare[T], on_done: Callable[[], None]) -> asyncio.Future[T]:
        if not isinstance(prepare, PayloadJob):
            # Refused before it is queued: the caller releases the model, as for any raise.
            raise TensorsNotServed(
                f"{self.what} answers request payloads, not tensors: POST the payload to "
                f"{self._route}"
            )
        if self._on_loop is None:
            return super().submit(prepare, on_done)
        if self._closed:
            raise RuntimeError(f"dispatcher of {self.name} is closed")
        return self._loop.create_task(self._answer_on_loop(self._on_loop, prepare, on_done))

    async def _answer_on_loop(
        self,
        answer: Callable[[PayloadRequest], Awaitable[Reply]],
        job: PayloadJob[T],
        on_done: Callable[[], None],
    ) -> T:
        try:
            started = time.perf_counter()
            try:
                reply = _checked(await answer(job.request))
            except Exception as exc:
                raise self._failure(exc) from None
            self._inferred(time.perf_counter() - started)
            return job.finish(reply)
        finally:
            on_done()

    # --- in the worker threads --------------------------------------------------------------

    def _run(self, batch: list[_Job[Any]]) -> bool:
        results: list[_Result] = []
        jobs: list[tuple[_Job[Any], PayloadJob[Any]]] = []
        for job in batch:
            if job.future.done():  # cancelled, expired, or its client went away: not run
                results.append((job, None, None))
            else:
                assert isinstance(job.prepare, PayloadJob)  # submit refuses anything else
                jobs.append((job, job.prepare))
        size = self.max_batch_size if self._batch is not None else 1
        flushed = time.perf_counter()
        for start in range(0, len(jobs), size):
            group = jobs[start : start + size]
            outcomes = self._call([payload.request for _, payload in group])
            for (job, payload), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    results.append((job, None, outcome))
                    continue
                try:
                    results.append((job, payload.finish(outcome), None))
                except Exception as exc:
                    results.append((job, None, exc))
            now = time.perf_counter()
            if now - flushed >= FLUSH_S and start + size < len(jobs):
                if not self._hand_back(results):
                    return False
                results, flushed = [], now
        return self._hand_back(results)

    def _call(self, requests: Sequence[PayloadRequest]) -> list[Reply | BaseException]:
        """One reply (or error) per request: one call for the lot when the model batches,
        else one each. A batch whose call fails is retried a request at a time, so a bad
        request fails alone."""
        started = time.perf_counter()
        try:
            if self._batch is None:
                replies = [_checked(self._answer(request)) for request in requests]
            else:
                replies = [_checked(reply) for reply in self._batch(requests)]
                if len(replies) != len(requests):
                    raise PredictionFailed(
                        f"answer_batch returned {len(replies)} replies for {len(requests)} requests"
                    )
        except Exception as exc:
            if len(requests) > 1:
                return [outcome for request in requests for outcome in self._call([request])]
            return [self._failure(exc)]
        self._inferred(time.perf_counter() - started)
        return list(replies)

    def _failure(self, exc: Exception) -> MultiserveError:
        """The error a failed answer becomes: the model's own status for a `MultiserveError`,
        else 500 naming the exception; the model keeps serving either way."""
        if isinstance(exc, MultiserveError):
            failure = type(exc)(f"{self.what}: {exc.message}")
            failure.headers = exc.headers
            return failure
        logger.error("%s raised while answering", self.what, exc_info=exc)
        return PredictionFailed(f"{self.what}: the model raised {type(exc).__name__}: {exc}")


def _no_tensors(inputs: Inputs) -> dict[str, Any]:
    raise TensorsNotServed("this model answers request payloads, not tensors")


def _checked(reply: object) -> Reply:
    if not isinstance(reply, Reply):
        raise PredictionFailed(f"the model returned {type(reply).__name__}, not a Reply")
    return reply


def warm_up(version_dir: Path, what: str, model: PayloadModel) -> None:
    """Run ``warmup.json`` through the model, if the version has one, as a JSON request before
    the version serves: an exception or an error status fails the load (and closes the model).
    Without it there is nothing to warm up on: a payload model's input has no metadata to make
    a sample from."""
    try:
        _warm_up(version_dir, what, model)
    except ModelLoadFailed:
        model.close()
        raise


def _warm_up(version_dir: Path, what: str, model: PayloadModel) -> None:
    path = version_dir / WARMUP_JSON
    if not path.is_file():
        return
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise ModelLoadFailed(f"{what}: its warm-up sample is unusable: {exc}") from exc
    request = PayloadRequest(body, "application/json")
    try:
        reply = _checked(model.answer(request))
    except MultiserveError as exc:
        raise ModelLoadFailed(f"{what} failed its warm-up: {exc.message}") from exc
    except Exception as exc:
        raise ModelLoadFailed(f"{what} failed its warm-up: {type(exc).__name__}: {exc}") from exc
    if reply.status >= 400:
        text = reply.body[:300].decode("utf-8", "replace")
        raise ModelLoadFailed(f"{what} failed its warm-up: it answered {reply.status}: {text}")
