"""cache_policy through a real server: a one-off scan leaves tinylfu's hot models loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from multiserve.backends import BackendRegistry
from tests.conftest import StartServer
from tests.integration.test_admin import admin_client, cache_of, npz_input, write_npz_models

HOT = ["a", "b", "c"]
SCAN = [f"s{i}" for i in range(8)]


@pytest.mark.parametrize("policy", ["tinylfu", "lru"])
def test_a_scan_of_one_off_models_keeps_the_hot_ones_loaded_only_under_tinylfu(
    start_server: StartServer, tmp_path: Path, npz_registry: BackendRegistry, policy: str
) -> None:
    write_npz_models(tmp_path, HOT + SCAN)
    server = start_server(tmp_path, npz_registry, max_models=4, cache_policy=policy)
    with admin_client(server) as client:
        for _ in range(5):
            for name in HOT:
                assert client.post(f"/models/{name}/predict", json=npz_input(2)).status_code == 200
        for name in SCAN:  # a batch job touching many models once; each is served
            assert client.post(f"/models/{name}/predict", json=npz_input(2)).status_code == 200
        cache = cache_of(client)
        loaded = {entry["name"] for entry in cache["entries"]}
        assert cache["budget"]["policy"] == policy
        assert len(loaded) == 4
        if policy == "tinylfu":
            assert set(HOT) <= loaded
            segments = {entry["name"]: entry["segment"] for entry in cache["entries"]}
            assert {segments[name] for name in HOT} == {"main"}
            assert all(entry["frequency"] >= 1 for entry in cache["entries"])
            loads = cache["stats"]["loads"]
            for name in HOT:  # hits: nothing loads again
                assert client.post(f"/models/{name}/predict", json=npz_input(2)).status_code == 200
            assert cache_of(client)["stats"]["loads"] == loads
        else:
            assert not set(HOT) & loaded  # flushed by the scan
