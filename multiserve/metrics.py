"""Prometheus metrics: requests, predictions, inference time, loads, evictions, swaps, the
cache against its budget, and repository scans. Each server has its own registry."""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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
LATENCY_BUCKETS = _LATENCY_BUCKETS
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
        r = self.registry
        # The series every request touches are plain counts kept by the event loop (and, for
        # inference time, by the models' worker threads under one lock), turned into
        # Prometheus families only when scraped: prometheus_client's objects take a lock and
        # several Python calls per update, which showed as a tenth of a small model's
        # request time (benchmarks/README.md). One record per route, method, status, model
        # and version holds what the four request families are summed from.
        self._requests: dict[tuple[str, str, int, str, str], list[float]] = {}
        self.in_flight = 0  # HTTP requests being served now (changed on the event loop only)
        # The same for gRPC calls, by method and code; a prediction's carries the HTTP status the
        # same error gets over HTTP, so that predictions count alike whichever way they came.
        self._rpcs: dict[tuple[str, str, int, str, str], list[float]] = {}
        self.rpcs_in_flight = 0
        self._known: Callable[[str], bool] = lambda model: False
        self.inference_duration = _Sums(
            "multiserve_inference_duration_seconds",
            "Time inside the model's predict, by model and version.",
            ("model", "version"),
        )
        self._inference_lock = threading.Lock()
        r.register(_RequestCollector(self))
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
            "(lru or tinylfu: to make room, by the cache policy; admin, version_policy, removed, "
            "replaced).",
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

    def observe_request(
        self, route: str, method: str, status: int, seconds: float, model: str, version: str
    ) -> None:
        """Count and time one HTTP request by its route template (never its raw path, which
        would let clients create unbounded label values); a prediction also by its model, if
        the model exists (a name from a URL becomes a label value only then). Call on the
        event loop."""
        if model and (status == 404 or route not in _PREDICTION_ROUTES or not self._known(model)):
            model = version = ""
        key = (route, method, status, model, version)
        record = self._requests.get(key)
        if record is None:
            record = self._requests[key] = _new_record()
        _observe(record, seconds)

    def observe_rpc(
        self, method: str, code: str, status: int, seconds: float, model: str, version: str
    ) -> None:
        """Count and time one gRPC call by its method (one of the service's, never a client's
        string) and status code; an inference also by its model, if the model exists. Call on
        the event loop."""
        if model and (status == 404 or not self._known(model)):
            model = version = ""
        key = (method, code, status, model, version)
        record = self._rpcs.get(key)
        if record is None:
            record = self._rpcs[key] = _new_record()
        _observe(record, seconds)

    def model_statistics(self) -> dict[tuple[str, str], ModelStatistics]:
        """Per (model, version): prediction requests over both protocols that succeeded and
        that failed once their version was known, and the calls of the model's predict."""
        found: dict[tuple[str, str], ModelStatistics] = {}

        def of(model: str, version: str) -> ModelStatistics:
            stats = found.get((model, version))
            if stats is None:
                stats = found[(model, version)] = ModelStatistics()
            return stats

        requests = [
            (key[2], key[3], key[4], record) for key, record in list(self._requests.items())
        ]
        requests += [(key[2], key[3], key[4], record) for key, record in list(self._rpcs.items())]
        for status, model, version, record in requests:
            if model and version:
                of(model, version).add_request(status < 400, record)
        with self._inference_lock:
            for (model, version), record in self.inference_duration.sums.items():
                of(model, version).executions += sum(record[:-1])
                of(model, version).execution_seconds += record[-1]
        return found

    def prediction_records(self) -> list[tuple[int, str, list[float]]]:
        """(status, model, latency record) of every prediction request counted so far, over
        both protocols, by known model (a copy: for `multiserve.status`)."""
        found = [(k[2], k[3], list(r)) for k, r in list(self._requests.items()) if k[3]]
        found += [(k[2], k[3], list(r)) for k, r in list(self._rpcs.items()) if k[3]]
        return found

    def watch(self, server: ModelServer) -> None:
        """Report the server's cache and catalog at each scrape, and label predictions only by
        the models in its catalog."""
        self.registry.register(_ServerCollector(server))
        self._known = lambda model: model in server.lifecycle.catalog.models

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
        # From the models' worker threads: the lock keeps concurrent updates whole.
        with self._inference_lock:
            self.inference_duration.observe((model, str(version)), seconds)


@dataclass(slots=True)
class ModelStatistics:
    successes: float = 0
    success_seconds: float = 0.0
    failures: float = 0
    failure_seconds: float = 0.0
    executions: float = 0
    execution_seconds: float = 0.0

    def add_request(self, succeeded: bool, record: list[float]) -> None:
        if succeeded:
            self.successes += sum(record[:-1])
            self.success_seconds += record[-1]
        else:
            self.failures += sum(record[:-1])
            self.failure_seconds += record[-1]


class _ServerCollector(Collector):
    def __init__(self, server: ModelServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
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
        yield from _drift_families(self.server)
        payload_log = self.server.monitoring.payload_log
        if payload_log is not None:
            samples = CounterMetricFamily(
                "multiserve_payload_samples",
                "Payload samples by outcome: written, or dropped (the directory full or "
                "unwritable, or the writer behind).",
                labels=("outcome",),
            )
            samples.add_metric(("written",), payload_log.written)
            samples.add_metric(("dropped",), payload_log.dropped)
            yield samples


def _drift_families(server: ModelServer) -> Iterator[GaugeMetricFamily]:
    """Input drift of the loaded versions, as last computed by their monitors. Label values
    are the catalog's model names and the models' own input names only."""
    score = GaugeMetricFamily(
        "multiserve_input_drift_score",
        "Largest population stability index among an input's features, over the drift window.",
        labels=("model", "version", "input"),
    )
    drifting = GaugeMetricFamily(
        "multiserve_input_drift",
        "1 when any input feature's PSI is above drift_threshold.",
        labels=("model", "version"),
    )
    catalog = server.lifecycle.catalog
    for (name, version), entry in server.lifecycle.loaded_entries():
        watch = entry.watch
        if watch is None or watch.drift is None or name not in catalog.models:
            continue
        report = watch.drift.cached()
        if report.checked_at is None or not report.features:
            continue
        known = {spec.name for spec in entry.model.metadata.inputs}
        for input_name, worst in sorted(report.worst_by_input().items()):
            if input_name in known and worst.psi is not None:
                score.add_metric((name, str(version), input_name), worst.psi)
        drifting.add_metric((name, str(version)), int(report.drift))
    yield score
    yield drifting


# The "le" label of each bucket, as prometheus_client writes it.
_BUCKET_BOUNDS = (*(repr(float(bound)) for bound in _LATENCY_BUCKETS), "+Inf")


class _RequestCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        http_requests = _Sums(
            "multiserve_http_requests",
            "HTTP requests by route template, method and status.",
            ("route", "method", "status"),
        )
        http_duration = _Sums(
            "multiserve_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ("route", "method"),
        )
        predictions = _Sums(
            "multiserve_predictions",
            "Prediction requests by model, version and status.",
            ("model", "version", "status"),
        )
        prediction_duration = _Sums(
            "multiserve_prediction_duration_seconds",
            "Prediction request latency, decoding to encoding, by model.",
            ("model",),
        )
        for (route, method, status, model, version), record in list(metrics._requests.items()):
            record = list(record)  # the loop may add to it meanwhile (a scrape runs on it too)
            http_requests.add((route, method, str(status)), record)
            http_duration.add((route, method), record)
            if model:
                predictions.add((model, version, str(status)), record)
                prediction_duration.add((model,), record)
        yield http_requests.counter()
        yield http_duration.histogram()
        yield _gauge(
            "multiserve_http_requests_in_flight",
            "HTTP requests being served now.",
            metrics.in_flight,
        )
        grpc_requests = _Sums(
            "multiserve_grpc_requests",
            "gRPC calls by method and status code.",
            ("method", "code"),
        )
        grpc_duration = _Sums(
            "multiserve_grpc_request_duration_seconds",
            "gRPC call latency by method.",
            ("method",),
        )
        for (method, code, status, model, version), record in list(metrics._rpcs.items()):
            record = list(record)
            grpc_requests.add((method, code), record)
            grpc_duration.add((method,), record)
            if model:
                predictions.add((model, version, str(status)), record)
                prediction_duration.add((model,), record)
        yield grpc_requests.counter()
        yield grpc_duration.histogram()
        yield _gauge(
            "multiserve_grpc_requests_in_flight",
            "gRPC calls being served now.",
            metrics.rpcs_in_flight,
        )
        yield predictions.counter()
        yield prediction_duration.histogram()
        with metrics._inference_lock:
            inference = metrics.inference_duration.histogram()
        yield inference


class _Sums:
    """A family of latency records (`_new_record`) by some labels: observed one by one, or
    summed from finer records; exported as a counter of observations or as a histogram."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]) -> None:
        self.name, self.documentation, self.labels = name, documentation, labels
        self.sums: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        record = self.sums.get(labels)
        if record is None:
            record = self.sums[labels] = _new_record()
        _observe(record, seconds)

    def add(self, labels: tuple[str, ...], record: list[float]) -> None:
        found = self.sums.get(labels)
        if found is None:
            self.sums[labels] = list(record)
        else:
            for i, value in enumerate(record):
                found[i] += value

    def counter(self) -> CounterMetricFamily:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, record in list(self.sums.items()):
            family.add_metric(labels, sum(record[:-1]))
        return family

    def histogram(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, record in list(self.sums.items()):
            family.add_metric(labels, _cumulative(record[:-1]), record[-1])
        return family


def _new_record() -> list[float]:
    """A latency record: a count per bucket of `_LATENCY_BUCKETS` and one past the last (not
    cumulative; summed at scrape), then the sum of the seconds observed."""
    return [0.0] * (len(_LATENCY_BUCKETS) + 2)


def _observe(record: list[float], seconds: float) -> None:
    # Prometheus buckets are "less than or equal": the first bound >= the value.
    record[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
    record[-1] += seconds


def _cumulative(counts: Sequence[float]) -> list[tuple[str, float]]:
    buckets, total = [], 0.0
    for bound, count in zip(_BUCKET_BOUNDS, counts, strict=True):
        total += count
        buckets.append((bound, total))
    return buckets


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
        metrics.in_flight += 1
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            metrics.in_flight -= 1
            route = scope.get("route")
            metrics.observe_request(
                getattr(route, "path", "unmatched"),
                scope["method"],
                status,
                time.perf_counter() - started,
                scope.get("path_params", {}).get("name", ""),
                version,
            )
