"""The admin API: bearer-token auth, cache inspection, explicit loads and evictions, LRU and byte
budgets, pins, drain-then-close, labels, and the operator state that survives a restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from multiserve.backends import BackendRegistry
from tests.conftest import ADMIN_TOKEN, RunningServer, StartServer
from tests.helpers import AUTH, error_of, wait_for
from tests.npz_backend import NpzModel, write_npz_model

MiB = 1024**2
MLP_INPUT = {"inputs": [[1, 2, 3, 4]]}


def admin_client(server: RunningServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=30, headers=AUTH)


def cache_of(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/admin/cache")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def loaded(client: httpx.Client) -> list[str]:
    """``name/version`` of every loaded model, least recently used first."""
    return [f"{e['name']}/{e['version']}" for e in cache_of(client)["entries"]]


def write_npz_models(root: Path, names: list[str], shape: tuple[int, int] = (2, 2)) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        write_npz_model(root / name / "1", rng.normal(size=shape).astype(np.float32))


def npz_input(columns: int) -> dict[str, Any]:
    return {"inputs": [[1.0] * columns]}


# --- auth ---------------------------------------------------------------------------------

ENDPOINTS: list[tuple[str, str, Mapping[str, str] | None]] = [
    ("GET", "/admin/cache", None),
    ("POST", "/admin/models/mlp/1/load", None),
    ("POST", "/admin/models/mlp/1/evict", None),
    ("POST", "/admin/models/mlp/1/pin", None),
    ("DELETE", "/admin/models/mlp/1/pin", None),
    ("PUT", "/admin/models/mlp/labels/stable", {"version": "1"}),
    ("DELETE", "/admin/models/mlp/labels/stable", None),
]
BAD_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token"},
    {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"},
    {"Authorization": "Bearer"},
    {"Authorization": f"Basic {ADMIN_TOKEN}"},
    {"Authorization": ADMIN_TOKEN},
]


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_admin_endpoint_without_the_right_token_is_401_and_changes_nothing(
    start_server: StartServer,
    model_repo: Path,
    method: str,
    path: str,
    body: Mapping[str, str] | None,
) -> None:
    server = start_server(model_repo)
    with server.client() as client:
        for headers in BAD_CREDENTIALS:
            response = client.request(method, path, json=body, headers=headers)
            error = error_of(response, 401)
            assert error["code"] == "unauthorized", headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert ADMIN_TOKEN not in response.text
        # Auth comes before anything else: an unknown model does not tell itself apart.
        unknown = client.request(method, path.replace("mlp", "nope"), json=body)
        error_of(unknown, 401)
    lifecycle = server.model_server.lifecycle
    assert lifecycle.loads == 0
    assert len(lifecycle.cache) == 0
    assert not lifecycle.cache.pins
    assert lifecycle.labels == {}
    assert not (model_repo / ".multiserve" / "state.json").exists()


def test_every_admin_endpoint_works_with_the_bearer_token(
    start_server: StartServer, model_repo: Path
) -> None:
    server = start_server(model_repo)
    with server.client() as client:
        for method, path, body in ENDPOINTS:
            response = client.request(method, path, json=body, headers=AUTH)
            assert response.status_code == 200, (method, path, response.text)
            assert response.headers["content-type"].startswith("application/json")
        # The scheme is case-insensitive, as RFC 9110 has it.
        lower = client.get("/admin/cache", headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
        assert lower.status_code == 200


# --- cache inspection and explicit loads ----------------------------------------------------


def test_admin_cache_shows_entries_totals_budget_and_stats(
    start_server: StartServer, model_repo: Path
) -> None:
    server = start_server(model_repo, max_models=3, max_memory="64MiB")
    with admin_client(server) as client:
        empty = cache_of(client)
        assert empty["entries"] == []
        assert empty["totals"] == {"models": 0, "memory_bytes": 0}
        assert empty["budget"] == {
            "max_models": 3,
            "max_memory_bytes": 64 * MiB,
            "policy": "tinylfu",
        }
        assert empty["pins"] == []
        assert empty["stats"]["hits"] == 0
        assert empty["stats"]["misses"] == 0
        assert empty["stats"]["loads"] == 0
        assert empty["stats"]["evictions"] == 0

        before = time.time()
        assert client.post("/models/mlp/1/predict", json=MLP_INPUT).status_code == 200
        first = cache_of(client)
        assert first["stats"]["misses"] == 1
        assert first["stats"]["hits"] == 0
        assert first["stats"]["loads"] == 1
        (entry,) = first["entries"]
        assert entry["name"] == "mlp"
        assert entry["version"] == "1"
        assert entry["memory_bytes"] > 0
        assert entry["pinned"] is False
        assert entry["in_flight"] == 0
        assert before - 1 <= entry["last_used"] <= time.time() + 1
        assert first["totals"] == {"models": 1, "memory_bytes": entry["memory_bytes"]}

        assert client.post("/models/mlp/1/predict", json=MLP_INPUT).status_code == 200
        assert client.post("/admin/models/adder/1/load").status_code == 200
        second = cache_of(client)
        assert second["stats"]["hits"] == 1
        assert second["stats"]["misses"] == 2
        assert second["stats"]["loads"] == 2
        assert second["totals"]["models"] == 2
        assert second["totals"]["memory_bytes"] == sum(e["memory_bytes"] for e in second["entries"])
        # Least recently used first.
        assert [e["name"] for e in second["entries"]] == ["mlp", "adder"]

        assert client.post("/admin/models/mlp/1/evict").status_code == 200
        third = cache_of(client)
        assert third["stats"]["evictions"] == 1
        assert [e["name"] for e in third["entries"]] == ["adder"]


def test_admin_cache_counts_evicted_versions_still_closing(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.eye(3, dtype=np.float32))
    (tmp_path / "slow" / "config.toml").write_text("close_delay_s = 1.0\n")
    server = start_server(tmp_path, npz_registry)
    with admin_client(server) as client:
        assert client.post("/admin/models/slow/1/load").status_code == 200
        assert cache_of(client)["stats"]["closing"] == 0
        assert client.post("/admin/models/slow/1/evict").status_code == 200
        # Out of the cache at once; its memory is released only when the close finishes.
        evicted = cache_of(client)
        assert evicted["entries"] == []
        assert evicted["stats"]["closing"] == 1
        wait_for(lambda: cache_of(client)["stats"]["closing"] == 0, 10, "the close to finish")


def test_admin_load_answers_once_the_version_is_ready(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_model(tmp_path / "slow" / "1", np.eye(3, dtype=np.float32))
    (tmp_path / "slow" / "config.toml").write_text("load_delay_s = 0.5\n")
    server = start_server(tmp_path, npz_registry)
    with admin_client(server) as client:
        response = client.post("/admin/models/slow/1/load")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["name"] == "slow"
        assert body["version"] == "1"
        assert body["state"] == "ready"
        assert body["memory_bytes"] >= 9 * 4
        assert body["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 3]}]
        assert loaded(client) == ["slow/1"]
        # Loading what is loaded is a no-op that answers the same.
        again = client.post("/admin/models/slow/latest/load")
        assert again.json()["state"] == "ready"
        assert server.model_server.lifecycle.loads == 1


def test_admin_load_of_a_corrupt_version_is_503_with_its_load_error(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "mlp/3").mkdir()
    (model_repo / "mlp/3/model.onnx").write_bytes(b"garbage, not an onnx model")
    server = start_server(model_repo)
    with admin_client(server) as client:
        error = error_of(client.post("/admin/models/mlp/3/load"), 503)
        assert error["code"] == "model_load_failed"
        assert "mlp version 3" in error["message"]
        assert loaded(client) == []
        assert cache_of(client)["stats"]["load_failures"] == 1


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/admin/models/nope/1/load", "model_not_found"),
        ("/admin/models/mlp/9/load", "version_not_found"),
        ("/admin/models/mlp/9/evict", "version_not_found"),
        ("/admin/models/mlp/9/pin", "version_not_found"),
    ],
)
def test_admin_actions_on_unknown_versions_are_404(
    start_server: StartServer, model_repo: Path, path: str, code: str
) -> None:
    with admin_client(start_server(model_repo)) as client:
        assert error_of(client.post(path), 404)["code"] == code


# --- eviction: LRU, pins, byte budget -----------------------------------------------------


@pytest.mark.parametrize(("touched", "evicted"), [(None, "a"), ("a", "b"), ("b", "a")], ids=str)
def test_the_least_recently_used_model_is_evicted_when_the_count_is_full(
    start_server: StartServer,
    tmp_path: Path,
    npz_registry: BackendRegistry,
    touched: str | None,
    evicted: str,
) -> None:
    write_npz_models(tmp_path, ["a", "b", "c"])
    server = start_server(tmp_path, npz_registry, max_models=2, cache_policy="lru")
    with admin_client(server) as client:
        for name in ("a", "b"):
            assert client.post(f"/models/{name}/predict", json=npz_input(2)).status_code == 200
        if touched is not None:
            assert client.post(f"/models/{touched}/predict", json=npz_input(2)).status_code == 200
        assert client.post("/admin/models/c/1/load").status_code == 200
        kept = sorted({"a", "b"} - {evicted})
        assert sorted(loaded(client)) == [f"{kept[0]}/1", "c/1"]
        assert cache_of(client)["stats"]["evictions"] == 1
        # The evicted one loads again on its next request, evicting the next least recent.
        assert client.post(f"/models/{evicted}/predict", json=npz_input(2)).status_code == 200
        assert sorted(loaded(client)) == sorted([f"{evicted}/1", "c/1"])


def test_a_pinned_model_is_never_evicted_and_refuses_admin_eviction(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_models(tmp_path, ["a", "b", "c"])
    server = start_server(tmp_path, npz_registry, max_models=2)
    with admin_client(server) as client:
        pinned = client.post("/admin/models/a/1/pin")
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["pinned"] is True
        assert pinned.json()["state"] == "ready"
        assert client.post("/admin/models/b/1/load").status_code == 200
        assert client.post("/admin/models/c/1/load").status_code == 200
        # a is the least recently used, but pinned: b goes.
        assert sorted(loaded(client)) == ["a/1", "c/1"]
        for name in ("b", "c", "b"):
            assert client.post(f"/admin/models/{name}/1/load").status_code == 200
            assert "a/1" in loaded(client)
        cache = cache_of(client)
        assert cache["pins"] == [{"name": "a", "version": "1"}]
        assert next(e for e in cache["entries"] if e["name"] == "a")["pinned"] is True

        error = error_of(client.post("/admin/models/a/1/evict"), 409)
        assert error["code"] == "conflict"
        assert "pinned" in error["message"]
        assert "a/1" in loaded(client)

        unpinned = client.delete("/admin/models/a/1/pin")
        assert unpinned.status_code == 200
        assert unpinned.json()["pinned"] is False
        assert cache_of(client)["pins"] == []
        evicted = client.post("/admin/models/a/1/evict")
        assert evicted.status_code == 200, evicted.text
        assert evicted.json()["state"] == "available"
        assert "a/1" not in loaded(client)


def test_a_model_that_fits_only_by_evicting_a_pinned_one_is_507(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_models(tmp_path, ["a", "b"])
    server = start_server(tmp_path, npz_registry, max_models=1)
    with admin_client(server) as client:
        assert client.post("/admin/models/a/1/pin").status_code == 200
        error = error_of(client.post("/models/b/predict", json=npz_input(2)), 507)
        assert error["code"] == "insufficient_memory"
        assert "pinned" in error["message"]
        assert loaded(client) == ["a/1"]
        assert cache_of(client)["stats"]["evictions"] == 0


def test_the_byte_budget_evicts_the_least_recently_used_and_is_never_exceeded(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    # 16 MiB of weights each against 40 MiB: two fit even if a load's RSS growth adds a few
    # MiB to its cost, and a third never does.
    size = 16 * MiB
    budget = 40 * MiB
    write_npz_models(tmp_path, ["a", "b", "c"], shape=(2048, 2048))
    server = start_server(tmp_path, npz_registry, max_memory=budget)
    with admin_client(server) as client:

        def check_budget() -> dict[str, Any]:
            cache = cache_of(client)
            assert cache["totals"]["memory_bytes"] <= budget
            assert cache["totals"]["memory_bytes"] == sum(
                e["memory_bytes"] for e in cache["entries"]
            )
            for entry in cache["entries"]:
                assert size <= entry["memory_bytes"] <= budget // 2, entry
            return cache

        for name in ("a", "b"):
            assert client.post(f"/admin/models/{name}/1/load").status_code == 200
            check_budget()
        assert loaded(client) == ["a/1", "b/1"]
        assert client.post("/models/a/predict", json=npz_input(2048)).status_code == 200
        assert client.post("/admin/models/c/1/load").status_code == 200
        assert sorted(loaded(client)) == ["a/1", "c/1"]
        assert check_budget()["stats"]["evictions"] == 1
        # Round and round: the budget holds at every step.
        for name in ("b", "a", "c", "b", "a"):
            assert client.post(f"/models/{name}/predict", json=npz_input(2048)).status_code == 200
            cache = check_budget()
            assert len(cache["entries"]) == 2
            assert loaded(client)[-1] == f"{name}/1"


def test_a_model_larger_than_the_whole_budget_is_507_and_evicts_nothing(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_models(tmp_path, ["small"], shape=(512, 512))  # 1 MiB
    write_npz_models(tmp_path, ["huge"], shape=(2048, 2048))  # 16 MiB
    server = start_server(tmp_path, npz_registry, max_memory="8MiB")
    with admin_client(server) as client:
        assert client.post("/admin/models/small/1/load").status_code == 200
        for response in (
            client.post("/admin/models/huge/1/load"),
            client.post("/models/huge/predict", json=npz_input(2048)),
        ):
            error = error_of(response, 507)
            assert error["code"] == "insufficient_memory"
            assert "huge version 1" in error["message"]
        cache = cache_of(client)
        assert loaded(client) == ["small/1"]
        assert cache["stats"]["evictions"] == 0
        assert cache["stats"]["loads"] == 1
        assert client.post("/models/small/predict", json=npz_input(512)).status_code == 200


def test_a_version_that_loads_larger_than_the_whole_budget_evicts_nothing(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry
) -> None:
    write_npz_models(tmp_path, ["small"], shape=(1024, 1024))  # 4 MiB
    # About 5 MB of file (compressed) that loads as 16 MiB: the file fits beside "small" only
    # after evicting it, the loaded model never fits.
    rng = np.random.default_rng(1)
    weights = np.zeros((2048, 2048), np.float32)
    weights[:640] = rng.normal(size=(640, 2048))
    (tmp_path / "sneaky" / "1").mkdir(parents=True)
    np.savez_compressed(tmp_path / "sneaky" / "1" / "model.npz", weights=weights)
    server = start_server(tmp_path, npz_registry, max_memory="8MiB")
    with admin_client(server) as client:
        assert client.post("/admin/models/small/1/load").status_code == 200
        error = error_of(client.post("/admin/models/sneaky/1/load"), 507)
        assert error["code"] == "insufficient_memory"
        assert loaded(client) == ["small/1"]
        assert cache_of(client)["stats"]["evictions"] == 0


def test_a_pin_that_cannot_load_leaves_nothing_pinned(
    start_server: StartServer, model_repo: Path
) -> None:
    (model_repo / "mlp/3").mkdir()
    (model_repo / "mlp/3/model.onnx").write_bytes(b"garbage, not an onnx model")
    server = start_server(model_repo, max_models=1)
    with admin_client(server) as client:
        assert error_of(client.post("/admin/models/mlp/3/pin"), 503)["code"] == (
            "model_load_failed"
        )
        assert client.post("/admin/models/adder/1/pin").status_code == 200
        # The only slot is pinned: mlp 1 cannot be pinned beside it.
        assert error_of(client.post("/admin/models/mlp/1/pin"), 507)["code"] == (
            "insufficient_memory"
        )
        cache = cache_of(client)
        assert cache["pins"] == [{"name": "adder", "version": "1"}]
        assert loaded(client) == ["adder/1"]
    state = json.loads((model_repo / ".multiserve" / "state.json").read_text())
    assert state["pins"] == [{"name": "adder", "version": 1}]


# --- drain then close ---------------------------------------------------------------------


def test_eviction_drains_a_running_request_before_closing_the_model(
    start_server: StartServer,
    tmp_path: Path,
    npz_registry: BackendRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delay = 1.5
    write_npz_model(tmp_path / "slow" / "1", np.eye(2, dtype=np.float32) * 3)
    (tmp_path / "slow" / "config.toml").write_text(f"predict_delay_s = {delay}\nwarmup = false\n")
    server = start_server(tmp_path, npz_registry)
    lifecycle = server.model_server.lifecycle
    with admin_client(server) as client, ThreadPoolExecutor(1) as pool:
        assert client.post("/admin/models/slow/1/load").status_code == 200
        entry = lifecycle.cache.peek(("slow", 1))
        assert entry is not None
        model = entry.model
        assert isinstance(model, NpzModel)

        started = threading.Event()
        closed_when_predict_ended: list[bool] = []
        original = model.predict

        def predict(inputs: Mapping[str, Any]) -> dict[str, Any]:
            started.set()
            result = original(inputs)
            closed_when_predict_ended.append(model.closed)
            return result

        monkeypatch.setattr(model, "predict", predict)
        running = pool.submit(
            httpx.post, f"{server.url}/models/slow/1/predict", json={"inputs": [[1, 2]]}, timeout=30
        )
        assert started.wait(10), "the prediction never started"
        assert cache_of(client)["entries"][0]["in_flight"] == 1

        began = time.monotonic()
        evicted = client.post("/admin/models/slow/1/evict")
        took = time.monotonic() - began
        assert evicted.status_code == 200, evicted.text
        # The eviction does not wait for the drain.
        assert not running.done()
        assert took < delay
        assert loaded(client) == []
        assert model.closed is False

        response = running.result(timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"]["y"] == [[3, 6]]
        assert closed_when_predict_ended == [False]
        wait_for(lambda: model.closed, 10, "the drained model to close")
        # The next request loads a fresh instance.
        assert client.post("/admin/models/slow/1/load").status_code == 200
        fresh = lifecycle.cache.peek(("slow", 1))
        assert fresh is not None
        assert fresh.model is not model


# --- labels -------------------------------------------------------------------------------


def test_a_label_routes_predictions_to_its_version(
    start_server: StartServer, model_repo: Path
) -> None:
    with admin_client(start_server(model_repo)) as client:
        response = client.put("/admin/models/mlp/labels/stable", json={"version": "1"})
        assert response.status_code == 200, response.text
        assert response.json() == {"name": "mlp", "labels": {"stable": "1"}}
        assert client.put("/admin/models/mlp/labels/canary", json={"version": 2}).status_code == 200

        for label, version in (("stable", "1"), ("canary", "2")):
            predicted = client.post(f"/models/mlp/{label}/predict", json=MLP_INPUT)
            assert predicted.status_code == 200, predicted.text
            assert predicted.json()["model_version"] == version
            assert predicted.headers["x-model-version"] == version
        model = client.get("/models/mlp").json()
        assert model["labels"] == {"canary": "2", "stable": "1"}
        by_version = {v["version"]: v["labels"] for v in model["versions"]}
        assert by_version == {"1": ["stable"], "2": ["canary"]}
        assert client.get("/models/mlp/stable").json()["version"] == "1"

        # Moving a label is a PUT again.
        assert (
            client.put("/admin/models/mlp/labels/stable", json={"version": "2"}).status_code == 200
        )
        assert client.post("/models/mlp/stable/predict", json=MLP_INPUT).json()[
            "model_version"
        ] == ("2")


@pytest.mark.parametrize("label", ["latest", "123", "bad name", "predict", "labels", "-x"])
def test_invalid_label_names_are_400(
    start_server: StartServer, model_repo: Path, label: str
) -> None:
    with admin_client(start_server(model_repo)) as client:
        error = error_of(
            client.put(f"/admin/models/mlp/labels/{label}", json={"version": "1"}), 400
        )
        assert error["code"] == "invalid_input"
        assert client.get("/models/mlp").json()["labels"] == {}


@pytest.mark.parametrize("version", ["9", "0", "abc", "01"])
def test_a_label_to_a_missing_version_is_404(
    start_server: StartServer, model_repo: Path, version: str
) -> None:
    with admin_client(start_server(model_repo)) as client:
        response = client.put("/admin/models/mlp/labels/stable", json={"version": version})
        assert error_of(response, 404)["code"] == "version_not_found"
        unknown_model = client.put("/admin/models/nope/labels/stable", json={"version": "1"})
        assert error_of(unknown_model, 404)["code"] == "model_not_found"
        assert client.get("/models/mlp").json()["labels"] == {}


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[1]", b"{}", b'{"version": true}', b'{"version": null}', b'{"version": [1]}'],
)
def test_a_malformed_label_body_is_400(
    start_server: StartServer, model_repo: Path, body: bytes
) -> None:
    with admin_client(start_server(model_repo)) as client:
        response = client.put(
            "/admin/models/mlp/labels/stable",
            content=body,
            headers={"content-type": "application/json"},
        )
        assert error_of(response, 400)["code"] == "malformed_request"
        assert client.get("/models/mlp").json()["labels"] == {}


def test_a_deleted_label_no_longer_routes(start_server: StartServer, model_repo: Path) -> None:
    with admin_client(start_server(model_repo)) as client:
        assert (
            client.put("/admin/models/mlp/labels/stable", json={"version": "1"}).status_code == 200
        )
        assert client.post("/models/mlp/stable/predict", json=MLP_INPUT).status_code == 200
        deleted = client.delete("/admin/models/mlp/labels/stable")
        assert deleted.status_code == 200, deleted.text
        assert deleted.json() == {"name": "mlp", "labels": {}}
        error = error_of(client.post("/models/mlp/stable/predict", json=MLP_INPUT), 404)
        assert error["code"] == "version_not_found"
        assert client.get("/models/mlp").json()["labels"] == {}
        # Deleting it again: there is no such label.
        error_of(client.delete("/admin/models/mlp/labels/stable"), 404)


# --- persistence --------------------------------------------------------------------------


def _decide_and_restart(
    start_server: StartServer, repo: Path, **settings: object
) -> tuple[RunningServer, RunningServer]:
    """Pin mlp 1 and label mlp 2 'stable' on one server, stop it, start another on ``repo``."""
    first = start_server(repo, **settings)
    with admin_client(first) as client:
        assert client.post("/admin/models/mlp/1/pin").status_code == 200
        assert (
            client.put("/admin/models/mlp/labels/stable", json={"version": "2"}).status_code == 200
        )
    first.stop()
    return first, start_server(repo, **settings)


def _check_restored(server: RunningServer) -> None:
    with admin_client(server) as client:
        assert cache_of(client)["pins"] == [{"name": "mlp", "version": "1"}]
        assert client.get("/models/mlp").json()["labels"] == {"stable": "2"}
        # The pinned version loads at start, without any request for it.
        wait_for(lambda: loaded(client) == ["mlp/1"], 10, "the pinned version to load")
        entry = cache_of(client)["entries"][0]
        assert entry["pinned"] is True
        assert error_of(client.post("/admin/models/mlp/1/evict"), 409)["code"] == "conflict"
        predicted = client.post("/models/mlp/stable/predict", json=MLP_INPUT)
        assert predicted.json()["model_version"] == "2"


def test_pins_and_labels_survive_a_restart(start_server: StartServer, model_repo: Path) -> None:
    _, second = _decide_and_restart(start_server, model_repo)
    _check_restored(second)
    state = json.loads((model_repo / ".multiserve" / "state.json").read_text())
    assert state["pins"] == [{"name": "mlp", "version": 1}]
    assert state["labels"] == {"mlp": {"stable": 2}}
    # The state directory is not mistaken for a model.
    with second.client() as client:
        names = {m["name"] for m in client.get("/models").json()["models"]}
        assert names == {"adder", "counter", "iris", "mlp", "regressor", "scaler"}


def test_state_dir_setting_puts_the_state_file_elsewhere(
    start_server: StartServer, model_repo: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "operator-state"
    _, second = _decide_and_restart(start_server, model_repo, state_dir=str(state_dir))
    _check_restored(second)
    assert not (model_repo / ".multiserve").exists()
    state = json.loads((state_dir / "state.json").read_text())
    assert state["pins"] == [{"name": "mlp", "version": 1}]
    assert state["labels"] == {"mlp": {"stable": 2}}


def test_unpinning_and_deleting_a_label_also_survive_a_restart(
    start_server: StartServer, model_repo: Path
) -> None:
    _, second = _decide_and_restart(start_server, model_repo)
    with admin_client(second) as client:
        assert client.delete("/admin/models/mlp/1/pin").status_code == 200
        assert client.delete("/admin/models/mlp/labels/stable").status_code == 200
    second.stop()
    third = start_server(model_repo)
    with admin_client(third) as client:
        assert cache_of(client)["pins"] == []
        assert client.get("/models/mlp").json()["labels"] == {}
    state = json.loads((model_repo / ".multiserve" / "state.json").read_text())
    assert state["pins"] == []
    assert state["labels"] == {}
