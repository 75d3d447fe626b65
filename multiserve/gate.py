"""A counting semaphore that serves its waiters in arrival order.

`threading.Semaphore` is not fair: a thread that calls ``acquire`` just after a ``release``
takes the freed turn ahead of the threads already waiting for it, so a model load queued behind
the memory gate could wait behind any number of later loads (the issue measured requests over
10 s under cache churn). Here a released turn is handed straight to the oldest waiter, and a
newcomer queues behind everyone already waiting: a waiter's wait is bounded by the work queued
before it.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FairGate:
    """At most ``turns`` holders at a time; waiters admitted first come, first served."""

    def __init__(self, turns: int = 1) -> None:
        if turns < 1:
            raise ValueError(f"a gate needs at least one turn, not {turns}")
        self.turns = turns
        self._lock = threading.Lock()
        self._free = turns
        # Each waiter's own lock, held until its turn is handed to it.
        self._waiters: deque[threading.Lock] = deque()

    @property
    def waiting(self) -> int:
        """Threads queued for a turn now."""
        return len(self._waiters)

    @property
    def held(self) -> int:
        """Turns held now."""
        with self._lock:
            return self.turns - self._free

    def acquire(self, blocking: bool = True) -> bool:
        """Take a turn, after every thread already waiting. False only when not ``blocking``
        and no turn is free for a newcomer now."""
        with self._lock:
            if self._free > 0 and not self._waiters:
                self._free -= 1
                return True
            if not blocking:
                return False
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        turn.acquire()  # released by the `release` that hands this waiter its turn
        return True

    def release(self) -> None:
        with self._lock:
            if self._waiters:
                # Handed over, never freed: no newcomer can take it in between.
                self._waiters.popleft().release()
            elif self._free < self.turns:
                self._free += 1
            else:
                raise ValueError("release of a turn that is not held")

    def __enter__(self) -> FairGate:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
