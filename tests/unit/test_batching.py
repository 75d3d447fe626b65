"""The per-model dispatcher: order, batching, failures that stay with their request, release."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from multiserve import batching
from multiserve.batching import Dispatcher, check_batchable
from multiserve.errors import PredictionFailed
from multiserve.types import Array, ModelMetadata, TensorSpec


class Doubler:
    """y = 2x, refusing any row with a negative value (as a model raising inside would)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[int] = []  # rows per call
        self.gate = gate
        self.entered = threading.Event()  # a call has started (and waits at the gate)

    def __call__(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        x = inputs["x"]
        self.calls.append(len(x))
        if (x < 0).any():
            raise PredictionFailed("negative input")
        return {"y": x * 2}


def job(values: list[list[float]]) -> batching.Prepare[list[list[float]]]:
    def prepare() -> tuple[batching.Inputs, batching.Finish[list[list[float]]]]:
        def finish(outputs: batching.Outputs) -> list[list[float]]:
            result: list[list[float]] = outputs["y"].tolist()
            return result

        return {"x": np.array(values, dtype=np.float32)}, finish

    return prepare


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait, without blocking the loop, until ``condition()`` holds: at most 10 s, generous on
    a busy machine, since it only bounds a test that is failing anyway."""
    deadline = asyncio.get_running_loop().time() + 10
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.001)


def queued_while_blocked(
    max_batch_size: int, bodies: list[list[list[float]]]
) -> tuple[list[object], int, Doubler]:
    """Submit all of ``bodies`` while the worker is stuck in a first job, so they are taken
    together, then return the results of those jobs."""

    async def main() -> tuple[list[object], int, Doubler]:
        gate = threading.Event()
        model = Doubler(gate)
        dispatcher = Dispatcher("m", model, max_batch_size=max_batch_size)
        blocker = dispatcher.submit(job([[0.0]]), lambda: None)
        await until(model.entered.is_set, "the worker to wait inside the blocker")
        released = 0

        def release() -> None:
            nonlocal released
            released += 1

        # Queued at once (submit does not wait), all while the worker is held in the blocker.
        futures = [dispatcher.submit(job(body), release) for body in bodies]
        gate.set()
        await blocker
        results: list[object] = list(await asyncio.gather(*futures, return_exceptions=True))
        dispatcher.close()
        dispatcher.join(5)
        model.calls.pop(0)  # the blocker's
        return results, released, model

    return asyncio.run(main())


def test_each_request_gets_its_own_answer_in_order() -> None:
    bodies = [[[float(i), float(i) + 0.5]] for i in range(50)]
    results, released, model = queued_while_blocked(1, bodies)
    assert results == [[[2.0 * i, 2.0 * i + 1.0]] for i in range(50)]
    assert released == 50
    assert model.calls == [1] * 50  # no batching unless configured


def test_batched_answers_equal_one_by_one_answers_and_respect_max_batch_size() -> None:
    bodies = [[[float(i)]] * (1 + i % 3) for i in range(40)]
    single, _, _ = queued_while_blocked(1, bodies)
    batched, released, model = queued_while_blocked(8, bodies)
    assert batched == single
    assert released == 40
    assert sum(model.calls) == sum(len(body) for body in bodies)
    assert max(model.calls) <= 8
    assert len(model.calls) < 40  # requests really shared calls


def test_a_bad_request_in_a_batch_fails_alone() -> None:
    bodies = [[[1.0]], [[2.0]], [[-1.0]], [[3.0]]]
    results, released, _ = queued_while_blocked(16, bodies)
    assert [results[0], results[1], results[3]] == [[[2.0]], [[4.0]], [[6.0]]]
    assert isinstance(results[2], PredictionFailed)
    assert released == 4


def test_inputs_of_other_shapes_or_dtypes_run_in_their_own_calls() -> None:
    bodies = [[[1.0]], [[1.0, 2.0]], [[3.0]]]  # the middle one has 2 columns
    results, _, model = queued_while_blocked(16, bodies)
    assert results == [[[2.0]], [[2.0, 4.0]], [[6.0]]]
    assert model.calls == [1, 1, 1]


def test_outputs_of_the_wrong_length_fall_back_to_one_by_one() -> None:
    calls: list[int] = []

    def summed(inputs: Mapping[str, Array]) -> dict[str, Array]:
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"].sum(axis=0)}  # not per row: one batched call would mix rows

    async def main() -> list[object]:
        gate = threading.Event()
        entered = threading.Event()

        def gated(inputs: Mapping[str, Array]) -> dict[str, Array]:
            entered.set()
            gate.wait(5)
            return summed(inputs)

        dispatcher = Dispatcher("m", gated, max_batch_size=4)
        blocker = dispatcher.submit(job([[0.0]]), lambda: None)
        await until(entered.is_set, "the worker to wait inside the blocker")
        futures = [dispatcher.submit(job([[1.0], [2.0]]), lambda: None) for _ in range(2)]
        gate.set()
        await blocker
        results = await asyncio.gather(*futures)
        dispatcher.close()
        return list(results)

    assert asyncio.run(main()) == [[3.0], [3.0]]
    assert calls[1:] == [4, 2, 2]


def test_a_failing_prepare_or_finish_fails_only_its_job() -> None:
    def bad_prepare() -> tuple[batching.Inputs, batching.Finish[object]]:
        raise ValueError("cannot decode")

    def bad_finish() -> tuple[batching.Inputs, batching.Finish[object]]:
        def finish(outputs: batching.Outputs) -> object:
            raise ValueError("cannot encode")

        return {"x": np.ones((1, 1), np.float32)}, finish

    async def main() -> list[object]:
        dispatcher = Dispatcher("m", Doubler(), max_batch_size=4)
        futures: list[asyncio.Future[object]] = [
            dispatcher.submit(bad_prepare, lambda: None),
            dispatcher.submit(bad_finish, lambda: None),
            dispatcher.submit(job([[1.0]]), lambda: None),
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        dispatcher.close()
        return list(results)

    first, second, third = asyncio.run(main())
    assert isinstance(first, ValueError)
    assert "decode" in str(first)
    assert isinstance(second, ValueError)
    assert "encode" in str(second)
    assert third == [[2.0]]


def test_a_cancelled_job_is_skipped_and_still_released() -> None:
    async def main() -> tuple[int, list[int]]:
        gate = threading.Event()
        model = Doubler(gate)
        dispatcher = Dispatcher("m", model)
        released = 0

        def release() -> None:
            nonlocal released
            released += 1

        blocker = dispatcher.submit(job([[0.0]]), release)
        await until(model.entered.is_set, "the worker to wait inside the blocker")
        doomed = dispatcher.submit(job([[5.0]]), release)
        doomed.cancel()
        gate.set()
        await blocker
        await until(lambda: released == 2, "the cancelled job's release")
        dispatcher.close()
        dispatcher.join(5)
        return released, model.calls

    released, calls = asyncio.run(main())
    assert released == 2
    assert calls == [1]  # the cancelled job never reached the model


def test_close_finishes_queued_jobs_then_refuses_new_ones() -> None:
    async def main() -> list[object]:
        dispatcher = Dispatcher("m", Doubler(), threads=2)
        futures = [dispatcher.submit(job([[float(i)]]), lambda: None) for i in range(10)]
        dispatcher.close()
        with pytest.raises(RuntimeError, match="closed"):
            dispatcher.submit(job([[1.0]]), lambda: None)
        results = await asyncio.gather(*futures)
        dispatcher.join(5)
        assert not any(thread.is_alive() for thread in dispatcher._threads)
        return list(results)

    assert asyncio.run(main()) == [[[2.0 * i]] for i in range(10)]


def test_settings_are_checked() -> None:
    async def main() -> None:
        with pytest.raises(ValueError, match="max_batch_size"):
            Dispatcher("m", Doubler(), max_batch_size=0)
        with pytest.raises(ValueError, match="threads"):
            Dispatcher("m", Doubler(), threads=0)

    asyncio.run(main())


def test_batching_needs_a_dynamic_first_dimension_on_every_input() -> None:
    dynamic = ModelMetadata(
        (TensorSpec("x", "float32", (-1, 4)), TensorSpec("m", "int64", (-1,))),
        (TensorSpec("y", "float32", (-1, 2)),),
    )
    fixed = ModelMetadata(
        (TensorSpec("x", "float32", (1, 4)),), (TensorSpec("y", "float32", (1,)),)
    )
    scalar = ModelMetadata((TensorSpec("t", "float32", ()),), (TensorSpec("y", "float32", ()),))
    check_batchable(dynamic, 16)
    check_batchable(fixed, 1)
    for metadata in (fixed, scalar):
        with pytest.raises(ValueError, match="dynamic first dimension"):
            check_batchable(metadata, 2)
