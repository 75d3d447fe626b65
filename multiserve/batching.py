"""Running a loaded model's requests off the event loop, several per hand-off.

Each loaded model has a `Dispatcher`: its own worker thread(s) and a queue. A request puts a job
on the queue and awaits a future. A worker takes every job waiting at once (up to
``max_jobs``), decodes each, runs the model (one call for the lot where the model's config
allows dynamic batching, else one call per job), encodes each answer, and hands all the
results back to the event loop in one ``call_soon_threadsafe``.

Why not a plain thread pool: with a small model, the hand-off itself (waking a thread, then
waking the loop) costs more than the inference, and a thread pool pays it per request. Under
load a dispatcher pays it per batch of requests, so the event loop spends its time on HTTP.
Measured in ``benchmarks/dispatch_cost.py``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from multiserve.errors import PredictionFailed
from multiserve.types import Array, ModelMetadata

logger = logging.getLogger("multiserve.batching")

T = TypeVar("T")
Inputs = Mapping[str, Array]
Outputs = dict[str, Array]
Finish = Callable[[Outputs], T]
# A job's first step, run in the worker: decode the request into the model's inputs, and say
# how to turn the model's outputs into the answer.
Prepare = Callable[[], tuple[Inputs, Finish[T]]]
Predict = Callable[[Inputs], Outputs]
# Told of the requests a worker answered (each one's inputs and outputs), in the worker, after
# their answers were handed back: drift statistics and payload samples (`multiserve.watch`).
Observe = Callable[[Sequence[tuple[Inputs, Outputs]]], None]

# Jobs one worker takes per wake-up: enough to drain a busy queue, few enough that the first
# job's answer is not held back long by the last one's inference.
MAX_JOBS = 32
# Longest a worker holds finished answers before handing them to the event loop.
FLUSH_S = 0.001


@dataclass(slots=True)
class _Job(Generic[T]):
    prepare: Prepare[T]
    future: asyncio.Future[T]
    on_done: Callable[[], None]


_Result = tuple[_Job[Any], Any, BaseException | None]


class Dispatcher:
    """Runs one model's jobs in ``threads`` worker threads, in arrival order.

    ``predict`` runs the model and raises `PredictionFailed` for an error inside it. With
    ``max_batch_size`` > 1, the inputs of jobs taken together are concatenated along their
    first dimension, up to that many rows per call, and the outputs split back; a batch whose
    call fails is retried one job at a time, so a bad request fails only itself. ``observe``,
    if given, is told of the jobs that succeeded once their answers are on their way.
    """

    def __init__(
        self,
        name: str,
        predict: Predict,
        *,
        max_batch_size: int = 1,
        threads: int = 1,
        loop: asyncio.AbstractEventLoop | None = None,
        observe: Observe | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.threads = threads
        self._predict = predict
        self.observe = observe
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"multiserve-{name}-{i}", daemon=True)
            for i in range(threads)
        ]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def submit(self, prepare: Prepare[T], on_done: Callable[[], None]) -> asyncio.Future[T]:
        """Queue a job (call on the event loop). ``on_done`` runs on the loop once the job is
        finished with, whether it succeeded, failed or was cancelled: release the model there.
        """
        if self._closed:
            raise RuntimeError(f"dispatcher of {self.name} is closed")
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Job(prepare, future, on_done))
        return future

    def close(self) -> None:
        """Stop the workers once the jobs queued before this call are done."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    # --- in the worker threads --------------------------------------------------------------

    def _work(self) -> None:
        jobs = self._queue
        while True:
            job = jobs.get()
            if job is None:
                return
            batch = [job]
            stop = False
            while len(batch) < MAX_JOBS:
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            if not self._run(batch) or stop:
                return

    def _run(self, batch: list[_Job[Any]]) -> bool:
        """Run the jobs and hand their results to the loop; False once the loop is gone."""
        if self.max_batch_size == 1:
            return self._run_each(batch)
        results: list[_Result] = []
        prepared: list[tuple[_Job[Any], Inputs, Finish[Any]]] = []
        for job in batch:
            if job.future.done():  # cancelled, expired, or its client went away: not run
                results.append((job, None, None))
                continue
            try:
                inputs, finish = job.prepare()
            except Exception as exc:
                results.append((job, None, exc))
                continue
            prepared.append((job, inputs, finish))
        # Results go back in one hand-off per FLUSH_S of work rather than one per job: a tiny
        # model's requests share the cost of waking the loop, and a slow model's first answer
        # is not held back until the last job taken with it is done.
        inputs_of = [inputs for _, inputs, _ in prepared]
        shapes = [_signature(inputs) for inputs in inputs_of]
        flushed = time.perf_counter()
        observed: list[tuple[Inputs, Outputs]] = []
        start = 0
        while start < len(prepared):
            end = _batch_end(shapes, start, self.max_batch_size)
            answers = self._predict_group(inputs_of[start:end], shapes[start:end])
            for (job, _, finish), answer in zip(prepared[start:end], answers, strict=True):
                if isinstance(answer, BaseException):
                    results.append((job, None, answer))
                    continue
                try:
                    results.append((job, finish(answer), None))
                except Exception as exc:
                    results.append((job, None, exc))
            if self.observe is not None:
                observed.extend(
                    (inputs, answer)
                    for inputs, answer in zip(inputs_of[start:end], answers, strict=True)
                    if not isinstance(answer, BaseException)
                )
            start = end
            now = time.perf_counter()
            if now - flushed >= FLUSH_S and start < len(prepared):
                if not self._hand_back(results):
                    return False
                results, flushed = [], now
        return self._hand_back(results) and self._observe(observed)

    def _run_each(self, batch: list[_Job[Any]]) -> bool:
        """`_run` without batching: each job decoded, run and encoded in turn."""
        predict = self._predict
        results: list[_Result] = []
        observed: list[tuple[Inputs, Outputs]] | None = None if self.observe is None else []
        flushed = time.perf_counter()
        last = len(batch) - 1
        for index, job in enumerate(batch):
            if job.future.done():  # cancelled, expired, or its client went away: not run
                results.append((job, None, None))
                continue
            try:
                inputs, finish = job.prepare()
                outputs = predict(inputs)
                results.append((job, finish(outputs), None))
                if observed is not None:
                    observed.append((inputs, outputs))
            except Exception as exc:
                results.append((job, None, exc))
            if index < last:
                now = time.perf_counter()
                if now - flushed >= FLUSH_S:
                    if not self._hand_back(results):
                        return False
                    results, flushed = [], now
        return self._hand_back(results) and self._observe(observed)

    def _observe(self, observed: list[tuple[Inputs, Outputs]] | None) -> bool:
        if observed and self.observe is not None:
            try:
                self.observe(observed)
            except Exception:  # monitoring must never stop a model's worker
                logger.exception("%s: observing answered requests failed", self.name)
        return True

    def _hand_back(self, results: list[_Result]) -> bool:
        if not results:
            return True
        try:
            self._loop.call_soon_threadsafe(_complete, results)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True

    def _predict_group(
        self, group: Sequence[Inputs], shapes: Sequence[_Shape | None]
    ) -> list[Outputs | BaseException]:
        """Answers for jobs that may share one call: one call if it succeeds and its outputs
        split back by rows, else one call per job (so a bad request fails only itself)."""
        if len(group) > 1:
            split = self._predict_batch(group, [shape[1] for shape in shapes if shape])
            if split is not None:
                return split
        return [self._predict_one(inputs) for inputs in group]

    def _predict_one(self, inputs: Inputs) -> Outputs | BaseException:
        try:
            return self._predict(inputs)
        except Exception as exc:
            return exc

    def _predict_batch(
        self, group: Sequence[Inputs], rows: list[int]
    ) -> list[Outputs | BaseException] | None:
        """One call for the group (``rows`` each), or None to run its jobs one by one."""
        joined = {name: np.concatenate([inputs[name] for inputs in group]) for name in group[0]}
        try:
            outputs = self._predict(joined)
        except PredictionFailed:
            return None  # which request broke it? each one alone will say
        total = sum(rows)
        if any(value.ndim == 0 or len(value) != total for value in outputs.values()):
            logger.warning(
                "%s: a batched call of %d rows returned outputs of another length; "
                "running requests one by one",
                self.name,
                total,
            )
            return None
        answers: list[Outputs | BaseException] = []
        offset = 0
        for count in rows:
            end = offset + count
            answers.append({name: value[offset:end] for name, value in outputs.items()})
            offset = end
        return answers


# What jobs must agree on to share a call (each input's name, dtype and shape after the first
# dimension), and the job's rows.
_Shape = tuple[tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...], int]


def _signature(inputs: Inputs) -> _Shape | None:
    """The job's `_Shape`, or None when it cannot share a call: no inputs, a scalar input, or
    inputs that disagree on their rows."""
    rows = -1
    parts = []
    for name, value in inputs.items():
        shape = value.shape
        if not shape or (rows != -1 and shape[0] != rows):
            return None
        rows = shape[0]
        parts.append((name, value.dtype, shape[1:]))
    return (tuple(parts), rows) if parts else None


def _batch_end(shapes: Sequence[_Shape | None], start: int, max_rows: int) -> int:
    """The end of the longest run of jobs from ``start`` that can share one call: the same
    `_Shape` apart from the rows, and no more than ``max_rows`` rows in all."""
    first = shapes[start]
    if max_rows <= 1 or first is None or first[1] > max_rows:
        return start + 1
    signature, rows = first
    end = start + 1
    while end < len(shapes):
        candidate = shapes[end]
        if candidate is None or candidate[0] != signature or rows + candidate[1] > max_rows:
            break
        rows += candidate[1]
        end += 1
    return end


def _complete(results: list[_Result]) -> None:
    for job, value, error in results:
        future = job.future
        if not future.done():
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)
        try:
            job.on_done()
        except Exception:
            logger.exception("releasing a finished job failed")


def check_batchable(metadata: ModelMetadata, max_batch_size: int) -> None:
    """Refuse ``max_batch_size`` > 1 for a model whose inputs cannot be stacked along a
    dynamic first dimension (ValueError, which becomes the version's load error)."""
    if max_batch_size <= 1:
        return
    for spec in metadata.inputs:
        if not spec.shape or spec.shape[0] != -1:
            raise ValueError(
                f"max_batch_size = {max_batch_size} needs a dynamic first dimension "
                f"(-1) on every input, and input {spec.name!r} has shape {list(spec.shape)}; "
                "set max_batch_size = 1 for this model"
            )
