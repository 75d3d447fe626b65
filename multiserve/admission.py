"""Admission control: what keeps one traffic spike, or one bad client, from hurting the rest.

- **A bounded wait per model version.** A request is queued on its version's dispatcher only
  while fewer than ``max_queue`` requests wait there beyond those its workers can run at once;
  past that it is answered 503 with ``Retry-After`` at once, instead of waiting behind a queue
  that would outlast its client. Each version's bound is its own, so a hot model sheds its own
  overflow and a quiet model's requests never wait behind it.
- **Deadlines.** ``request_timeout_s`` (and a client's ``X-Request-Timeout`` header, which can
  only ask for less) bounds the time from arrival to answer: at the deadline a request still
  queued is dropped unrun (the dispatcher skips a job whose future is already done) and
  answered 504.
- **Disconnected clients.** While a request waits behind others, its connection is watched:
  when the client goes away the job is dropped unrun.
- **Bytes being received**, summed over the process (`BodyBudget`): past ``max_receive_bytes``
  a request is answered 503, so many large uploads at once cannot exhaust memory.

Every refusal is counted by model (``multiserve_requests_shed_total``), for known models only.
All of it runs on the event loop and costs a request that need not wait nothing but a
comparison.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter

from multiserve.errors import MalformedRequest, MultiserveError

if TYPE_CHECKING:
    from multiserve.catalog import Key, VersionRecord
    from multiserve.lifecycle import LoadedEntry

logger = logging.getLogger("multiserve.admission")

T = TypeVar("T")
Receive = Callable[[], Any]  # an ASGI receive callable

TIMEOUT_HEADER = "x-request-timeout"
# The default bound on requests waiting per model version (beyond those running).
DEFAULT_MAX_QUEUE = 128
# Admin and repository bodies are small JSON objects.
ADMIN_BODY_BYTES = 64 * 1024
# A deadline shorter than this is refused, longer than this is capped: no timer in the past,
# and no float that overflows the loop's clock.
_SHORTEST_S = 0.001
_LONGEST_S = 86_400.0


class Overloaded(MultiserveError):
    """The model's queue, or the process's budget of bytes being received, is full: retrying
    shortly may succeed."""

    status_code = 503
    code = "overloaded"
    headers = {"Retry-After": "1"}


class DeadlineExceeded(MultiserveError):
    """The request's deadline passed before its answer was ready; if it had not started, it
    was never run."""

    status_code = 504
    code = "deadline_exceeded"


class ClientGone(MultiserveError):
    """The client disconnected while its request waited: it was not run. Nobody reads this
    answer; the status (nginx's 499) is for the metrics and the access log."""

    status_code = 499
    code = "client_disconnected"


class Reservation:
    """The bytes one request has received so far, held against the process's budget until
    `release`."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    def add(self, nbytes: int) -> None:
        budget = self._budget
        if budget.limit and budget.held + nbytes > budget.limit:
            budget.on_refused()
            raise Overloaded(
                f"the server is receiving {budget.held} bytes of request bodies, its limit "
                f"(max_receive_bytes) is {budget.limit}: retry shortly"
            )
        budget.held += nbytes
        self.held += nbytes

    def release(self) -> None:
        self._budget.held -= self.held
        self.held = 0


class BodyBudget:
    """Bytes of request bodies held by requests in progress, over the whole process (on the
    event loop only). 0: no bound."""

    def __init__(self, limit: int, on_refused: Callable[[], None] = lambda: None) -> None:
        self.limit = limit
        self.held = 0
        self.on_refused = on_refused

    def reserve(self) -> Reservation:
        return Reservation(self)


class Admission:
    """The bounds of `multiserve.admission` for one server."""

    def __init__(
        self,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        request_timeout_s: float = 0.0,
        max_receive_bytes: int = 0,
        registry: CollectorRegistry | None = None,
        known: Callable[[str], bool] = lambda model: True,
    ) -> None:
        self.max_queue = max_queue
        self.request_timeout_s = request_timeout_s
        self._known = known
        # Set by `admit` for the job it just let in: whether that job waits behind others
        # (read by the caller right after submitting, before any await).
        self.queued = False
        # Per version, the jobs answered here (expired, or their client gone) that their
        # dispatcher has not reached yet: they no longer count as waiting.
        self._dropped: dict[Key, set[asyncio.Future[Any]]] = {}
        self.shed = Counter(
            "multiserve_requests_shed",
            "Requests answered by admission control instead of by their model, by model and "
            "reason: queue_full (503 at once, never run), deadline (504: its deadline passed "
            "first), disconnected (its client went away first). A request not started by then "
            "is never run; one already running finishes, and its answer is dropped.",
            ["model", "reason"],
            registry=registry,
        )
        self.receive_refused = Counter(
            "multiserve_request_bodies_refused",
            "Requests answered 503 because the process held max_receive_bytes of bodies.",
            registry=registry,
        )
        self.bodies = BodyBudget(max_receive_bytes, self.receive_refused.inc)

    # --- the queue bound (in `Lifecycle._submit`, on the event loop) -------------------------

    def admit(self, entry: LoadedEntry) -> None:
        """Let a request onto ``entry``'s dispatcher, or raise `Overloaded`. ``entry.in_flight``
        already counts it."""
        dispatcher = entry.dispatcher
        running = dispatcher.threads * dispatcher.max_batch_size
        dropped = self._dropped.get(entry.record.key)
        waiting = entry.in_flight - running - (len(dropped) if dropped else 0)
        self.queued = waiting > 0
        if self.max_queue and waiting > self.max_queue:
            record = entry.record
            self._count(record.name, "queue_full")
            raise Overloaded(
                f"{record.name} version {record.version} has {self.max_queue} requests "
                "waiting already (max_queue): retry shortly"
            )

    def released(self, key: Key, future: asyncio.Future[Any]) -> None:
        """The dispatcher is done with ``future``'s job (run, failed or skipped)."""
        dropped = self._dropped.get(key)
        if dropped is not None:
            dropped.discard(future)
            if not dropped:
                del self._dropped[key]

    def _drop(self, record: VersionRecord, future: asyncio.Future[Any], error: Exception) -> None:
        self._dropped.setdefault(record.key, set()).add(future)
        future.set_exception(error)

    # --- deadlines and disconnections ----------------------------------------------------

    def deadline(self, header: str | bytes | None) -> float | None:
        """The request's deadline on the loop's clock, from ``request_timeout_s`` and the
        client's ``X-Request-Timeout`` (seconds; it can only shorten the server's). None: no
        deadline. 400 for a header that is not a positive number of seconds."""
        return self.deadline_after(_seconds(header) if header else None)

    def deadline_after(self, seconds: float | None) -> float | None:
        """The deadline on the loop's clock for a client that allows ``seconds`` (None: says
        nothing, as most do), within ``request_timeout_s``. gRPC's own deadline comes here."""
        timeout = self.request_timeout_s or math.inf
        if seconds is not None:
            timeout = min(timeout, max(seconds, 0.0))
        if timeout == math.inf:
            return None
        return asyncio.get_running_loop().time() + min(timeout, _LONGEST_S)

    async def wait(
        self,
        record: VersionRecord,
        future: asyncio.Future[T],
        deadline: float | None,
        receive: Receive | None,
    ) -> T:
        """The job's answer; `DeadlineExceeded` once ``deadline`` passes first, `ClientGone`
        when ``receive`` (an ASGI request whose body was read whole) says the client left
        first. Either way a job not started yet is never run."""
        loop = asyncio.get_running_loop()
        timer = None
        watcher = None
        if deadline is not None:
            timer = loop.call_at(deadline, self._expire, record, future)
        if receive is not None:
            watcher = loop.create_task(self._watch(record, future, receive))
        try:
            return await future
        finally:
            if timer is not None:
                timer.cancel()
            if watcher is not None:
                watcher.cancel()

    def _expire(self, record: VersionRecord, future: asyncio.Future[Any]) -> None:
        if not future.done():
            self._count(record.name, "deadline")
            self._drop(
                record,
                future,
                DeadlineExceeded(
                    f"{record.name} version {record.version} did not answer within the "
                    "request's deadline"
                ),
            )

    async def _watch(
        self, record: VersionRecord, future: asyncio.Future[Any], receive: Receive
    ) -> None:
        # With the body read, an ASGI server's receive() returns only once the client has
        # gone (or the response is complete, and then this task is already cancelled).
        message = await receive()
        if message.get("type") == "http.disconnect" and not future.done():
            self._count(record.name, "disconnected")
            self._drop(
                record, future, ClientGone("the client disconnected while its request waited")
            )

    def _count(self, model: str, reason: str) -> None:
        self.shed.labels(model if self._known(model) else "", reason).inc()


def _seconds(header: str | bytes) -> float:
    text = header.decode("latin-1") if isinstance(header, bytes) else header
    text = text.strip()
    try:
        if not text.isascii():
            raise ValueError
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds >= _SHORTEST_S:  # NaN included
        raise MalformedRequest(
            f"{TIMEOUT_HEADER} must be a number of seconds >= {_SHORTEST_S}, not {text[:40]!r}"
        )
    return seconds
