"""Evicting a model gives its memory back: a 100 MB ONNX model loaded and evicted over and over
leaves the process no bigger than after the first round, and the cache counts what it weighs."""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from multiserve.memory import rss_bytes
from tests.conftest import StartServer
from tests.helpers import AUTH, wait_for

MB = 1000**2
# x [1, 5000] @ W [5000, 5000]: 25 million float32 weights, 100 MB, that every prediction reads
# (a MatMul with a runtime input cannot be constant-folded away).
FEATURES = 5000
WEIGHT_BYTES = FEATURES * FEATURES * 4
CYCLES = 8
# Allocator noise, not a model: a leak of one model's weights per cycle would be 700 MB.
TOLERANCE = 60 * MB


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[float]]:
    """A repository holding ``big`` version 1, and its output for an input of ones."""
    root = tmp_path_factory.mktemp("big-models")
    weights = np.random.default_rng(0).standard_normal((FEATURES, FEATURES), dtype=np.float32)
    expected = weights.sum(axis=0, dtype=np.float64).tolist()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, FEATURES])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    del weights
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (root / "big" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "big" / "1" / "model.onnx"))
    return root, expected


def current_rss() -> int:
    rss = rss_bytes()
    if rss is None:
        pytest.skip("this platform has no /proc/self/statm")
    return rss


def test_evicting_a_large_model_returns_its_memory(
    start_server: StartServer, big_model: tuple[Path, list[float]]
) -> None:
    root, expected = big_model
    server = start_server(root)
    lifecycle = server.model_server.lifecycle
    ones = {"inputs": [[1.0] * FEATURES]}
    settled_rss: list[int] = []
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        for cycle in range(CYCLES):
            response = client.post("/admin/models/big/1/load")
            assert response.status_code == 200, response.text
            assert response.json()["state"] == "ready"
            (entry,) = client.get("/admin/cache").json()["entries"]
            assert entry["memory_bytes"] >= WEIGHT_BYTES, entry
            loaded_entry = lifecycle.cache.peek(("big", 1))
            assert loaded_entry is not None
            model = weakref.ref(loaded_entry.model)
            del loaded_entry
            if cycle in (0, CYCLES - 1):
                predicted = client.post("/models/big/1/predict", json=ones)
                assert predicted.status_code == 200, predicted.text
                np.testing.assert_allclose(
                    predicted.json()["outputs"]["y"][0], expected, rtol=1e-4, atol=1e-2
                )
            loaded_rss = current_rss()

            evicted = client.post("/admin/models/big/1/evict")
            assert evicted.status_code == 200, evicted.text
            assert client.get("/admin/cache").json()["entries"] == []
            # Closed and dropped: nothing in the server still holds the model.
            deadline = time.monotonic() + 15
            while model() is not None:
                assert time.monotonic() < deadline, f"cycle {cycle}: the model was never released"
                gc.collect()
                time.sleep(0.05)
            settled_rss.append(current_rss())
            # The measurement can see a model: it took its weights' worth while loaded.
            assert loaded_rss - settled_rss[-1] >= WEIGHT_BYTES // 2, (
                f"cycle {cycle}: RSS {loaded_rss / MB:.0f} MB loaded, "
                f"{settled_rss[-1] / MB:.0f} MB after the eviction"
            )
    assert lifecycle.loads == CYCLES
    assert lifecycle.evictions == CYCLES
    growth = settled_rss[-1] - settled_rss[0]
    assert growth < TOLERANCE, (
        f"RSS grew by {growth / MB:.0f} MB over {CYCLES} load/evict cycles: "
        + ", ".join(f"{rss / MB:.0f}" for rss in settled_rss)
    )


# A 25 MB model: big enough that its cost stands out of the allocator's noise, small enough
# to load in a few tens of milliseconds.
STEADY_FEATURES = 2500


def matmul_model(root: Path, features: int) -> Path:
    weights = np.random.default_rng(1).standard_normal((features, features), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "steady",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, features])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = root / "steady" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(model, str(path))
    return path


def in_process_cost(path: Path, features: int) -> int:
    """What a session of the model costs this process once loaded and run, the heap trimmed."""
    import onnxruntime as ort

    from multiserve.memory import release_freed_memory

    release_freed_memory()
    before = current_rss()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.zeros((1, features), np.float32)})
    release_freed_memory()
    cost = current_rss() - before
    del session
    release_freed_memory()
    return cost


def test_the_same_model_is_charged_the_same_every_time(
    start_server: StartServer, tmp_path: Path
) -> None:
    path = matmul_model(tmp_path, STEADY_FEATURES)
    server = start_server(tmp_path)
    charged: list[int] = []
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as client:
        for _ in range(5):
            assert client.post("/admin/models/steady/1/load").status_code == 200
            (entry,) = client.get("/admin/cache").json()["entries"]
            # Measured (the load ran alone); the backend's figure (its file) wins if larger.
            assert entry["memory"]["measured_bytes"] is not None, entry
            assert entry["memory"]["bytes"] == entry["memory_bytes"]
            charged.append(entry["memory_bytes"])
            assert client.post("/admin/models/steady/1/evict").status_code == 200
            wait_for(
                lambda: client.get("/admin/cache").json()["stats"]["closing"] == 0, 15, "close"
            )
    steady = in_process_cost(path, STEADY_FEATURES)
    median = statistics.median(charged)
    mb = ", ".join(f"{c / MB:.1f}" for c in charged)
    assert all(abs(c - median) <= 0.15 * median for c in charged), f"charged {mb} MB"
    assert 0.8 * steady <= median <= 1.5 * steady, f"charged {mb} MB, steady {steady / MB:.1f} MB"
