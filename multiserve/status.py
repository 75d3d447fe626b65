"""What the dashboard shows (``GET /status``): every model and version with its state, pins
and labels; the cache against its budgets; per-model traffic over the last minutes; recent
loads, swaps and evictions; drift; the repository's health.

Traffic history costs the request path nothing: every `SAMPLE_S` seconds `History.sample`
reads the request counts the metrics keep anyway, and keeps the difference from the previous
reading (requests per second, latency percentiles from the histogram buckets, error rate).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from multiserve import __version__
from multiserve.metrics import LATENCY_BUCKETS, Metrics

if TYPE_CHECKING:
    from multiserve.server import ModelServer

SAMPLE_S = 5.0
HISTORY_POINTS = 60  # five minutes of samples
EVENTS = 50


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    kind: str  # "loaded", "load_failed", "evicted", "swapped"
    model: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 3),
            "kind": self.kind,
            "model": self.model,
            "detail": self.detail,
        }


class History:
    """Recent traffic per model, and recent lifecycle events. Runs on the event loop."""

    def __init__(self, interval_s: float = SAMPLE_S, points: int = HISTORY_POINTS) -> None:
        self.interval_s = interval_s
        self.events: deque[Event] = deque(maxlen=EVENTS)
        self.points: dict[str, deque[dict[str, Any]]] = {}
        self._points = points
        self._previous: dict[str, list[float]] | None = None
        self._previous_at = 0.0
        self.started_at = time.time()

    # --- events (the lifecycle observer's, forwarded by `Observers`) ------------------------

    def loaded(self, model: str, seconds: float) -> None:
        self.events.append(Event(time.time(), "loaded", model, f"in {seconds:.3f} s"))

    def load_failed(self, model: str) -> None:
        self.events.append(Event(time.time(), "load_failed", model, ""))

    def evicted(self, model: str, reason: str) -> None:
        self.events.append(Event(time.time(), "evicted", model, reason))

    def swapped(self, model: str) -> None:
        self.events.append(Event(time.time(), "swapped", model, ""))

    # --- traffic ----------------------------------------------------------------------------

    async def run(self, metrics: Metrics) -> None:
        # Woken often, so that a changed interval_s applies at once (tests shorten it).
        while True:
            if time.time() - self._previous_at >= self.interval_s:
                self.sample(metrics)
            await asyncio.sleep(min(self.interval_s, 0.5))

    def sample(self, metrics: Metrics, now: float | None = None) -> None:
        """Take one point per model: the requests since the previous call."""
        now = time.time() if now is None else now
        totals = _per_model(metrics)
        previous, self._previous = self._previous, totals
        elapsed = now - self._previous_at
        self._previous_at = now
        if previous is None or elapsed <= 0:
            return
        for model, record in totals.items():
            before = previous.get(model)
            delta = (
                record if before is None else [a - b for a, b in zip(record, before, strict=True)]
            )
            self._add(model, _point(now, elapsed, delta))
        for model in list(self.points):
            if model not in totals:
                self._add(model, _point(now, elapsed, None))

    def _add(self, model: str, point: dict[str, Any]) -> None:
        points = self.points.get(model)
        if points is None:
            points = self.points[model] = deque(maxlen=self._points)
        points.append(point)


def _per_model(metrics: Metrics) -> dict[str, list[float]]:
    """Per model: the latency bucket counts, then the errors (status >= 400)."""
    size = len(LATENCY_BUCKETS) + 1
    totals: dict[str, list[float]] = {}
    for status, model, record in metrics.prediction_records():
        if not model:
            continue
        total = totals.get(model)
        if total is None:
            total = totals[model] = [0.0] * (size + 1)
        for i in range(size):
            total[i] += record[i]
        if status >= 400:
            total[size] += sum(record[:size])
    return totals


def _point(now: float, elapsed: float, delta: list[float] | None) -> dict[str, Any]:
    if delta is None:
        count, errors, counts = 0.0, 0.0, []
    else:
        counts = delta[:-1]
        count, errors = sum(counts), delta[-1]
    return {
        "at": round(now, 3),
        "rps": round(count / elapsed, 3),
        "p50_ms": _quantile(counts, count, 0.5, LATENCY_BUCKETS),
        "p99_ms": _quantile(counts, count, 0.99, LATENCY_BUCKETS),
        "error_rate": round(errors / count, 4) if count else 0.0,
    }


def _quantile(
    counts: list[float], total: float, q: float, bounds: tuple[float, ...]
) -> float | None:
    """A latency percentile (ms) from bucket counts, interpolated within its bucket as
    Prometheus's histogram_quantile does; past the last bound, the last bound."""
    if total <= 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if seen + count >= rank and count > 0:
            if i >= len(bounds):
                return round(bounds[-1] * 1000, 3)
            low = bounds[i - 1] if i else 0.0
            high = bounds[i]
            return round((low + (high - low) * (rank - seen) / count) * 1000, 3)
        seen += count
    return None


class Observers:
    """Tells both the metrics and the history of lifecycle events; inference times go to the
    metrics alone (bound directly, so the hot path pays no extra call)."""

    def __init__(self, metrics: Metrics, history: History) -> None:
        self._metrics = metrics
        self._history = history
        self.inferred = metrics.inferred

    def loaded(self, model: str, seconds: float) -> None:
        self._metrics.loaded(model, seconds)
        self._history.loaded(model, seconds)

    def load_failed(self, model: str) -> None:
        self._metrics.load_failed(model)
        self._history.load_failed(model)

    def evicted(self, model: str, reason: str) -> None:
        self._metrics.evicted(model, reason)
        self._history.evicted(model, reason)

    def swapped(self, model: str) -> None:
        self._metrics.swapped(model)
        self._history.swapped(model)


# --- the document ---------------------------------------------------------------------------


def drift_summary(report: Any) -> dict[str, Any]:
    """A version's drift in brief (a `multiserve.monitor.DriftReport`)."""
    return {
        "drift": report.drift,
        "since": report.since,
        "reference": report.reference_source.split(":", 1)[0],
        "reference_rows": report.reference_rows,
        "window_rows": report.window_rows,
        "worst": [{"input": s.input, **s.to_json()} for s in report.worst(3)],
    }


def build(server: ModelServer) -> dict[str, Any]:
    """The ``GET /status`` document (cheap: read on the event loop)."""
    lifecycle = server.lifecycle
    cache = lifecycle.cache
    models = []
    for model in lifecycle.catalog.models.values():
        latest = lifecycle.latest(model.name)
        versions = []
        for record in model.descending():
            state, error = lifecycle.state(record)
            version: dict[str, Any] = {
                "version": str(record.version),
                "state": state.value,
                "backend": record.backend,
                "pinned": cache.is_pinned(record.key),
                "labels": sorted(
                    label
                    for label, v in lifecycle.labels.get(model.name, {}).items()
                    if v == record.version
                ),
            }
            if error is not None:
                version["error"] = error
            entry = cache.peek(record.key)
            if entry is not None:
                version["memory_bytes"] = entry.memory_bytes
                version["loaded_at"] = round(entry.loaded_at, 3)
                watch = entry.watch
                if watch is not None and watch.drift is not None:
                    version["drift"] = drift_summary(watch.drift.cached())
            versions.append(version)
        models.append(
            {
                "name": model.name,
                "latest": None if latest is None else str(latest.version),
                "versions": versions,
            }
        )
    history = server.history
    repository: dict[str, Any] = {
        "source": str(server.repository.root),
        "status": "degraded" if server.degraded_reason else "ok",
        "reason": server.degraded_reason,
        "models": len(lifecycle.catalog.models),
        "versions": len(lifecycle.catalog.records()),
    }
    payload_log = server.monitoring.payload_log
    return {
        "server": {
            "version": __version__,
            "ready": server.ready,
            "reason": server.not_ready_reason,
            "uptime_s": round(time.time() - history.started_at, 1),
            "time": round(time.time(), 3),
        },
        "repository": repository,
        "cache": {
            "models": len(cache),
            "max_models": cache.max_items,
            "bytes": cache.total_bytes,
            "max_bytes": cache.max_bytes,
            "pinned": len(cache.pins),
        },
        "models": models,
        "traffic": {
            "interval_s": history.interval_s,
            "models": {name: list(points) for name, points in history.points.items()},
        },
        "events": [event.to_json() for event in reversed(history.events)],
        "payload_samples": None
        if payload_log is None
        else {"written": payload_log.written, "dropped": payload_log.dropped},
        "counters": _counters(lifecycle.loads, lifecycle.swaps, lifecycle.evictions),
    }


def _counters(loads: int, swaps: int, evictions: int) -> Mapping[str, int]:
    return {"loads": loads, "swaps": swaps, "evictions": evictions}
