"""FairGate: the memory gate's turns go to waiters in arrival order."""

from __future__ import annotations

import threading
import time
from typing import Protocol

import pytest

from multiserve.gate import FairGate
from multiserve.memory import MemoryMeter, load_concurrency


class Gate(Protocol):
    def acquire(self, blocking: bool = True) -> bool: ...

    def release(self) -> None: ...


def _queue_in_order(gate: FairGate, count: int, order: list[int]) -> list[threading.Thread]:
    """Threads 0..count-1 queued on ``gate`` (held), each known to wait before the next."""

    def waiter(index: int) -> None:
        gate.acquire()
        order.append(index)
        time.sleep(0.001)  # hold the turn a moment, as a load would
        gate.release()

    threads = []
    for index in range(count):
        thread = threading.Thread(target=waiter, args=(index,))
        thread.start()
        deadline = time.monotonic() + 5
        while gate.waiting < index + 1:
            assert time.monotonic() < deadline, "the waiter never queued"
            time.sleep(0.001)
        threads.append(thread)
    return threads


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_waiters_are_admitted_in_arrival_order(turns: int) -> None:
    gate = FairGate(turns)
    for _ in range(turns):
        gate.acquire()
    order: list[int] = []
    threads = _queue_in_order(gate, 12, order)
    for _ in range(turns):
        gate.release()
    for thread in threads:
        thread.join(timeout=5)
    if turns == 1:
        assert order == list(range(12))
    else:
        # Up to `turns` run at once, so neighbours may finish in either order; none is ever
        # admitted before a waiter `turns` places ahead of it.
        for position, index in enumerate(order):
            assert abs(position - index) < turns, order
    assert gate.held == 0
    assert gate.waiting == 0


def _barges(gate: Gate) -> bool:
    """Whether a newcomer took the turn just released while a thread was waiting for it."""

    def wait_for_a_turn() -> None:
        gate.acquire()
        gate.release()

    gate.acquire()
    waiter = threading.Thread(target=wait_for_a_turn)
    waiter.start()
    time.sleep(0.02)  # the waiter is blocked in acquire by now
    gate.release()
    barged = gate.acquire(blocking=False)
    if barged:
        gate.release()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    return barged


def test_a_newcomer_never_takes_a_turn_ahead_of_a_waiter() -> None:
    gate = FairGate(1)
    assert not any(_barges(gate) for _ in range(5))


def test_the_barging_check_catches_an_unfair_semaphore() -> None:
    # The control: threading.Semaphore hands a released turn to whoever asks first, which is
    # how a miss could wait behind any number of later ones. The check above must see it.
    assert any(_barges(threading.Semaphore(1)) for _ in range(5))


def test_releasing_more_than_was_taken_is_an_error() -> None:
    gate = FairGate(2)
    with pytest.raises(ValueError, match="not held"):
        gate.release()
    with pytest.raises(ValueError, match="at least one"):
        FairGate(0)


def test_load_threads_zero_follows_the_core_count() -> None:
    assert load_concurrency(3) == 3
    assert [load_concurrency(0, cores) for cores in (1, 2, 4, 8, 64)] == [1, 1, 2, 4, 4]
    assert load_concurrency(0) >= 1


def test_work_that_overlapped_other_work_is_not_measured_as_alone() -> None:
    # With two loads at once, neither may charge itself the process's growth over its run
    # (it includes the other's): both fall back to what their backend reports.
    meter = MemoryMeter(2)
    both_in = threading.Barrier(2)
    costs: list[str] = []

    def load() -> None:
        def work() -> bytearray:
            both_in.wait(timeout=5)
            return bytearray(1024)

        _, cost = meter.measure(work, lambda _: 1 << 30)
        costs.append(cost.method)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert costs == ["reported", "reported"]
    _, cost = meter.measure(lambda: bytearray(1024), lambda _: 0)
    assert cost.measured_bytes is not None  # alone: measured (charged if not below reported)
