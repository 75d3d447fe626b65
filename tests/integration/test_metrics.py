"""A Prometheus scrape shows every series the dashboards need, with values that add up."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import StartServer
from tests.helpers import AUTH, wait_for


def scrape(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(
    samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float:
    return sum(v for found, v in samples.get(name, []) if labels.items() <= found.items())


def state_of(client: httpx.Client, version: str) -> str | None:
    versions = client.get("/models/mlp").json()["versions"]
    return next((v["state"] for v in versions if v["version"] == version), None)


def test_scrape_shows_requests_latency_loads_evictions_swaps_and_the_cache(
    start_server: StartServer, model_repo: Path
) -> None:
    server = start_server(model_repo, max_models=2, max_memory="1GiB")
    with server.client() as client:
        for _ in range(3):
            assert (
                client.post("/models/mlp/predict", json={"inputs": [[1, 2, 3, 4]]}).status_code
                == 200
            )
        assert client.post("/models/mlp/predict", json={"inputs": [[1, 2]]}).status_code == 400
        assert client.post("/models/nope/predict", json={"inputs": [1]}).status_code == 404
        # Refused before its model is looked up: still no label for a name that is no model.
        unknown = client.post(
            "/models/nope2/predict", content=b"x", headers={"content-type": "text/plain"}
        )
        assert unknown.status_code == 415
        v2 = client.post(
            "/v2/models/nope3/infer", content=b"x", headers={"content-type": "text/plain"}
        )
        assert v2.status_code in (404, 415)
        # A corrupt version 3 fails its load; a good version 4 is swapped in.
        (model_repo / "mlp/3").mkdir()
        (model_repo / "mlp/3/model.onnx").write_bytes(b"not a model")
        wait_for(lambda: state_of(client, "3") == "failed", 10, "version 3 to fail")
        (model_repo / "mlp/4").mkdir()
        shutil.copy(model_repo / "mlp/1/model.onnx", model_repo / "mlp/4/model.onnx")
        wait_for(lambda: client.get("/models/mlp").json()["latest"] == "4", 10, "version 4")
        client.post("/admin/models/adder/1/load", headers=AUTH)
        client.post("/admin/models/counter/1/load", headers=AUTH)  # evicts the least recent
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = scrape(response.text)

    assert (
        value(samples, "multiserve_predictions_total", model="mlp", version="2", status="200") == 3
    )
    assert value(samples, "multiserve_predictions_total", model="mlp", status="400") == 1
    # Unknown model names never become label values.
    assert not [
        labels
        for labels, _ in samples["multiserve_predictions_total"]
        if labels["model"] in ("nope", "nope2", "nope3")
    ]
    assert (
        value(
            samples, "multiserve_http_requests_total", route="/models/{name}/predict", status="404"
        )
        == 1
    )
    assert value(samples, "multiserve_prediction_duration_seconds_count", model="mlp") == 4
    assert (
        value(samples, "multiserve_inference_duration_seconds_count", model="mlp", version="2") == 3
    )
    assert value(samples, "multiserve_http_request_duration_seconds_count") >= 6
    assert value(samples, "multiserve_http_requests_in_flight") == 1  # the scrape itself
    assert value(samples, "multiserve_model_loads_total", model="mlp", outcome="success") == 2
    assert value(samples, "multiserve_model_loads_total", model="mlp", outcome="failure") == 1
    assert value(samples, "multiserve_model_load_duration_seconds_count", model="adder") == 1
    assert value(samples, "multiserve_model_evictions_total", reason="tinylfu") == 1
    assert value(samples, "multiserve_model_swaps_total", model="mlp") == 1
    assert (
        value(samples, "multiserve_model_evictions_total", model="mlp", reason="version_policy")
        == 1
    )
    assert value(samples, "multiserve_cache_models") == 2
    assert value(samples, "multiserve_cache_max_models") == 2
    assert value(samples, "multiserve_cache_max_bytes") == 1024**3
    assert value(samples, "multiserve_cache_bytes") > 0
    assert value(samples, "multiserve_repository_scans_total") >= 1
    assert "multiserve_repository_events_total" in samples
    assert value(samples, "multiserve_ready") == 1
    assert not [name for name in samples if name.endswith("_created")]
