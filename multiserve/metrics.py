"""Prometheus metrics: requests, predictions, inference time, loads, evictions, swaps, the
cache against its budget, and repository scans. Each server has its own registry."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from multiserve.server import ModelServer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Request latencies from sub-millisecond (a small model on loopback) to a cold load of a large one.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Routes whose requests are predictions, and so carry a model label.
_PREDICTION_ROUTES = frozenset(
    {
        "/models/{name}/predict",
        "/models/{name}/{version}/predict",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    }
)


class Metrics:
    """Also the lifecycle's observer: it is told of every load, failure, eviction and swap."""

    def __init__(self) -> None:
        # The *_created series double every scrape's size and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.http_requests = Counter(
            "multiserve_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "multiserve_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "multiserve_http_requests_in_flight", "HTTP requests being served now.", registry=r
        )
        self.predictions = Counter(
            "multiserve_predictions",
            "Prediction requests by model, version and status.",
            ["model", "version", "status"],
            registry=r,
        )
        self.prediction_duration = Histogram(
            "multiserve_prediction_duration_seconds",
            "Prediction request latency, decoding to encoding, by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "multiserve_inference_duration_seconds",
            "Time inside the model's predict, by model and version.",
            ["model", "version"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            "multiserve_model_loads",
            "Model loads by model and outcome (success, failure).",
            ["model", "outcome"],
            registry=r,
        )
        self.load_duration = Histogram(
            "multiserve_model_load_duration_seconds",
            "Load plus warm-up time of a model version.",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "multiserve_model_evictions",
            "Loaded versions taken out of the cache, by model and reason "
            "(lru, admin, version_policy, removed, replaced).",
            ["model", "reason"],
            registry=r,
        )
        self.swaps = Counter(
            "multiserve_model_swaps",
            "Times latest moved to a newly loaded version.",
            ["model"],
            registry=r,
        )
        self.scans = Counter(
            "multiserve_repository_scans", "Scans of the model repository.", registry=r
        )
        self.scan_duration = Histogram(
            "multiserve_repository_scan_duration_seconds",
            "Time to scan the model repository.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.scan_failures = Counter(
            "multiserve_repository_scan_failures",
            "Scans that could not read the repository (the bucket unreachable, say).",
            registry=r,
        )
        self.events = Counter(
            "multiserve_repository_events",
            "Batches of file-system events seen in the repository.",
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the lookup is on every request's path."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def observe_request(
        self, route: str, method: str, status: int, seconds: float, model: str, version: str
    ) -> None:
        """Count and time one HTTP request by its route template (never its raw path, which
        would let clients create unbounded label values); a prediction also by its model."""
        child = self.child
        child(self.http_requests, route, method, str(status)).inc()
        child(self.http_duration, route, method).observe(seconds)
        if route in _PREDICTION_ROUTES and status != 404:
            child(self.predictions, model, version, str(status)).inc()
            child(self.prediction_duration, model).observe(seconds)

    def watch(self, server: ModelServer) -> None:
        """Report the server's cache and catalog at each scrape."""
        self.registry.register(_ServerCollector(server))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- the lifecycle observer -----------------------------------------------------------

    def loaded(self, model: str, seconds: float) -> None:
        self.loads.labels(model, "success").inc()
        self.load_duration.labels(model).observe(seconds)

    def load_failed(self, model: str) -> None:
        self.loads.labels(model, "failure").inc()

    def evicted(self, model: str, reason: str) -> None:
        self.evictions.labels(model, reason).inc()

    def swapped(self, model: str) -> None:
        self.swaps.labels(model).inc()

    def inferred(self, model: str, version: int, seconds: float) -> None:
        self.child(self.inference_duration, model, str(version)).observe(seconds)


class _ServerCollector(Collector):
    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lifecycle = self.server.lifecycle
        cache = lifecycle.cache
        yield _gauge("multiserve_cache_models", "Model versions loaded now.", len(cache))
        yield _gauge(
            "multiserve_cache_bytes", "Bytes of the loaded model versions.", cache.total_bytes
        )
        yield _gauge(
            "multiserve_cache_max_models", "Bound on loaded versions (0: none).", cache.max_items
        )
        yield _gauge(
            "multiserve_cache_max_bytes", "Bound on loaded bytes (0: none).", cache.max_bytes
        )
        yield _gauge("multiserve_cache_pinned", "Pinned versions.", len(cache.pins))
        yield _gauge(
            "multiserve_repository_versions",
            "Versions in the repository.",
            len(lifecycle.catalog.records()),
        )
        yield _gauge(
            "multiserve_ready", "1 when the server is ready to serve.", int(self.server.ready)
        )
        yield _gauge(
            "multiserve_repository_degraded",
            "1 while the repository cannot be read; loaded models keep serving.",
            int(self.server.degraded_reason is not None),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (never its raw path, which
    would let clients create unbounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        version = ""

        async def send_and_watch(message: Message) -> None:
            nonlocal status, version
            if message["type"] == "http.response.start":
                status = message["status"]
                for key, value in message.get("headers", ()):
                    if key == b"x-model-version":
                        version = value.decode("latin-1")
            await send(message)

        metrics = self.metrics
        metrics.in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            metrics.in_flight.dec()
            route = scope.get("route")
            metrics.observe_request(
                getattr(route, "path", "unmatched"),
                scope["method"],
                status,
                time.perf_counter() - started,
                scope.get("path_params", {}).get("name", ""),
                version,
            )
