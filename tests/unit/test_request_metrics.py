"""The hot-path metric series, kept as plain counts, scrape exactly as prometheus_client's own
counters and histograms would."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from multiserve.http import predict
from multiserve.metrics import _LATENCY_BUCKETS, Metrics

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples_of(text: bytes, prefix: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name.startswith(prefix):
                found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_counts_and_buckets_match_prometheus_client_at_every_bound() -> None:
    # Each bucket bound itself (inclusive, "le"), just either side of it, zero and past the top.
    values = [0.0, 100.0]
    for bound in _LATENCY_BUCKETS:
        values += [bound, bound * (1 - 1e-9), bound * (1 + 1e-9)]
    route = "/models/{name}/{version}/predict"

    ours = Metrics()
    for i, seconds in enumerate(values):
        ours.observe_request(route, "POST", 200 if i % 3 else 400, seconds, "mlp", "2")
        ours.inferred("mlp", 2, seconds)

    registry = CollectorRegistry()
    requests = Counter(
        "multiserve_http_requests", "", ["route", "method", "status"], registry=registry
    )
    latency = Histogram(
        "multiserve_http_request_duration_seconds",
        "",
        ["route", "method"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    inference = Histogram(
        "multiserve_inference_duration_seconds",
        "",
        ["model", "version"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    for i, seconds in enumerate(values):
        requests.labels(route, "POST", "200" if i % 3 else "400").inc()
        latency.labels(route, "POST").observe(seconds)
        inference.labels("mlp", "2").observe(seconds)
    reference = generate_latest(registry)

    for prefix in (
        "multiserve_http_requests_total",
        "multiserve_http_request_duration_seconds",
        "multiserve_inference_duration_seconds",
    ):
        expected = samples_of(reference, prefix)
        got = samples_of(ours.render(), prefix)
        assert expected, prefix
        assert got.keys() == expected.keys(), prefix
        for key, value in expected.items():
            assert abs(got[key] - value) < 1e-9, key


def test_inference_times_from_many_threads_all_count() -> None:
    metrics = Metrics()

    def work() -> None:
        for _ in range(2000):
            metrics.inferred("mlp", 1, 0.001)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    found = samples_of(metrics.render(), "multiserve_inference_duration_seconds_count")
    assert sum(found.values()) == 8000


def test_predict_paths_match_as_starlette_path_parameters_would() -> None:
    assert predict.match("/models/mlp/predict") == (predict.LATEST_ROUTE, "mlp", "latest")
    assert predict.match("/models/mlp/3/predict") == (predict.ROUTE, "mlp", "3")
    assert predict.match("/models/mlp/stable/predict") == (predict.ROUTE, "mlp", "stable")
    for path in (
        "/models//predict",
        "/models/mlp//predict",
        "/models/mlp/predict/",
        "/models/mlp/3/predict/x",
        "/models/mlp",
        "/v2/models/mlp/infer",
        "/model/mlp/predict",
    ):
        assert predict.match(path) is None, path
