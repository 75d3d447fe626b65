"""optimize / export in a model's config.toml: the derived model is checked against the
original before it serves, and kept in the derived-model cache across evictions and restarts."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema  # type: ignore[import-untyped]
import numpy as np
import pytest

from examples.make_models import write_exported
from multiserve.http.openapi import build
from tests.conftest import StartServer
from tests.helpers import AUTH, wait_for
from tests.optimize_models import classifier_logits, write_classifier, write_torch_classifier


def described(client: httpx.Client, name: str, version: str = "latest") -> dict[str, Any]:
    """GET /models/{name}/{version}, which loads the version if it is not loaded (deriving
    what its config.toml asks for: a child process that imports its runtime)."""
    response = client.get(f"/models/{name}/{version}", timeout=110)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def documented(body: dict[str, Any]) -> None:
    """``body`` is what the OpenAPI document says GET /models/{name}/{version} answers."""
    schema = {"$ref": "#/components/schemas/VersionDescription", **build()}
    jsonschema.Draft202012Validator(schema).validate(body)


def predict(client: httpx.Client, name: str, inputs: Any, version: str = "latest") -> Any:
    response = client.post(f"/models/{name}/{version}/predict", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    return response.json()


def reference_rows(version_dir: Path, rows: int = 16) -> np.ndarray:
    with np.load(version_dir / "reference.npz") as arrays:
        x: np.ndarray = arrays["x"][:rows]
    return x


def cache_entries(cache: Path) -> list[Path]:
    """Derived models in the store (load caches, `multiserve.load_cache`, left out)."""
    return sorted(p for p in cache.glob("*/*/*") if p.is_dir() and not p.name.startswith("load-"))


@pytest.fixture
def classifier_repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_classifier(root / "clf" / "1")
    return root


def test_int8_serves_a_faster_model_that_picks_the_same_classes(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    server = start_server(classifier_repo, optimize_cache_dir=str(tmp_path / "derived"))
    with server.client() as client:
        version = described(client, "clf")
        documented(version)
        block = version["optimized"]
        assert block["kind"] == "int8"
        assert block["accepted"] is True, block["reason"]
        assert block["speedup"] >= 1.2
        assert block["argmax_agreement"] >= 0.99
        assert block["optimized_bytes"] < block["source_bytes"] / 2  # int8 weights
        assert block["sample"] == "reference.npz"
        assert block["reused"] is False
        assert block["backend"] == "onnx"

        x = reference_rows(classifier_repo / "clf" / "1")
        served = np.array(predict(client, "clf", x.tolist())["outputs"]["logits"])
    original = classifier_logits(classifier_repo / "clf" / "1", x)
    np.testing.assert_array_equal(served.argmax(1), original.argmax(1))
    # What serves is the quantised model: near the original's answers, not equal to them.
    assert 0 < np.abs(served - original).max() <= block["max_abs_error"] * 1.5


def test_graph_optimised_model_serves_the_same_answers(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "graph"\n')
    server = start_server(classifier_repo, optimize_cache_dir=str(tmp_path / "derived"))
    with server.client() as client:
        block = described(client, "clf")["optimized"]
        assert block["kind"] == "graph"
        assert block["accepted"] is True, block["reason"]
        assert block["max_abs_error"] <= 1e-4
        x = reference_rows(classifier_repo / "clf" / "1")
        served = np.array(predict(client, "clf", x.tolist())["outputs"]["logits"])
    np.testing.assert_allclose(
        served, classifier_logits(classifier_repo / "clf" / "1", x), atol=1e-4
    )
    (entry,) = cache_entries(tmp_path / "derived")
    assert entry.name.startswith("graph-")
    assert 'optimization = "disable"' in (entry / "config.toml").read_text()


def torch_answer(version_dir: Path, x: list[list[float]]) -> np.ndarray:
    """What the torch model answers, computed with torch alone."""
    import torch

    inputs = torch.tensor(x, dtype=torch.float32)
    with torch.inference_mode():
        if (version_dir / "model.pt2").is_file():
            result = torch.export.load(str(version_dir / "model.pt2")).module()(inputs)
        else:
            with warnings.catch_warnings():  # TorchScript is deprecated upstream
                warnings.simplefilter("ignore", DeprecationWarning)
                scripted = torch.jit.load(str(version_dir / "model.pt"))  # type: ignore[no-untyped-call]
            result = scripted(inputs)
    output = result[0] if isinstance(result, tuple | list) else result
    answer: np.ndarray = output.numpy()
    return answer


@pytest.mark.torch
def test_torch_models_export_to_onnx_and_on_to_int8(
    start_server: StartServer, tmp_path: Path
) -> None:
    root = tmp_path / "models"
    write_exported(root / "regressor" / "1", seed=4)  # torch.export: model.pt2
    (root / "regressor" / "config.toml").write_text('export = "onnx"\n')
    write_torch_classifier(root / "clf" / "1")  # TorchScript: model.pt + its config.toml
    (root / "clf" / "config.toml").write_text('export = "onnx"\noptimize = "int8"\n')
    server = start_server(root, optimize_cache_dir=str(tmp_path / "derived"))
    with server.client() as client:
        # Both derive at once, each in its own process, while the server answers.
        with ThreadPoolExecutor(2) as pool:
            regressor, clf = pool.map(lambda name: described(client, name), ("regressor", "clf"))

        block = regressor["exported"]
        assert block["accepted"] is True, block["reason"]
        assert block["backend"] == "onnx"
        assert block["max_rel_error"] <= 1e-4
        assert [spec["name"] for spec in regressor["outputs"]] == ["output_0"]
        x = [[0.1, 0.2, 0.3, 0.4], [-1.0, 2.0, 0.5, 3.0]]
        served = predict(client, "regressor", x)["outputs"]["output_0"]
        expected = torch_answer(root / "regressor" / "1", x)
        np.testing.assert_allclose(np.array(served), expected, rtol=1e-4, atol=1e-5)

        # The classifier's export is as accurate as torch; whether it alone would be faster
        # than torch does not matter: the int8 model derived from it is, and serves.
        assert clf["exported"]["max_rel_error"] <= 1e-4, clf["exported"]["reason"]
        block = clf["optimized"]
        assert block["accepted"] is True, block["reason"]
        assert block["speedup"] >= 1.2  # over torch
        assert block["source_bytes"] == clf["exported"]["optimized_bytes"]
        rows = reference_rows(root / "clf" / "1")
        served = np.array(predict(client, "clf", rows.tolist())["outputs"]["logits"])
    expected = torch_answer(root / "clf" / "1", rows.tolist())
    np.testing.assert_array_equal(served.argmax(1), expected.argmax(1))
    assert np.abs(served - expected).max() > 1e-3  # the int8 model serves, not the export


def test_a_model_outside_the_tolerance_serves_its_original_with_the_reason(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    # int8 moves every logit: no quantised model is within 1e-6 of the original.
    (classifier_repo / "clf" / "config.toml").write_text(
        'optimize = "int8"\nmax_abs_error = 1e-6\n'
    )
    server = start_server(classifier_repo, optimize_cache_dir=str(tmp_path / "derived"))
    with server.client() as client:
        version = described(client, "clf")
        block = version["optimized"]
        assert block["accepted"] is False
        assert "is over max_abs_error = 1e-06" in block["reason"]
        assert block["max_abs_error"] > 1e-6
        assert version["state"] == "ready"
        x = reference_rows(classifier_repo / "clf" / "1")
        served = np.array(predict(client, "clf", x.tolist())["outputs"]["logits"], np.float32)
    # The original serves: its answers, to the bit.
    np.testing.assert_array_equal(served, classifier_logits(classifier_repo / "clf" / "1", x))


def test_the_derived_model_is_reused_across_eviction_and_restart(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    cache = tmp_path / "derived"
    first = start_server(classifier_repo, optimize_cache_dir=str(cache))
    with first.client() as client:
        assert described(client, "clf")["optimized"]["reused"] is False
        (entry,) = cache_entries(cache)
        built = (entry / "model.onnx").stat().st_mtime_ns
        response = client.post("/admin/models/clf/1/evict", headers=AUTH)
        assert response.status_code == 200, response.text
        wait_for(lambda: "optimized" not in described_list(client), 10, "the eviction")
        block = described(client, "clf")["optimized"]
        assert block["reused"] is True
        assert block["accepted"] is True
    assert first.model_server.lifecycle.optimizer.builds == 1
    first.stop()

    second = start_server(classifier_repo, optimize_cache_dir=str(cache))
    with second.client() as client:
        block = described(client, "clf")["optimized"]
        assert block["reused"] is True
        assert block["accepted"] is True
    assert second.model_server.lifecycle.optimizer.builds == 0
    assert cache_entries(cache) == [entry]
    assert (entry / "model.onnx").stat().st_mtime_ns == built


def described_list(client: httpx.Client, name: str = "clf") -> dict[str, Any]:
    """The version as GET /models/{name} lists it: without loading it."""
    versions: list[dict[str, Any]] = client.get(f"/models/{name}").json()["versions"]
    return versions[0]


def test_changed_files_are_derived_again_while_the_old_version_serves(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    (classifier_repo / "clf" / "1" / "READY").touch()
    cache = tmp_path / "derived"
    server = start_server(classifier_repo, optimize_cache_dir=str(cache), settle_window_s=0.2)
    x = reference_rows(classifier_repo / "clf" / "1", rows=2).tolist()
    with server.client() as client:
        assert described(client, "clf")["optimized"]["accepted"] is True
        answers: list[str] = []
        stop = threading.Event()

        def keep_predicting() -> None:
            with server.client() as own:
                while not stop.is_set():
                    answers.append(predict(own, "clf", x)["model_version"])

        traffic = threading.Thread(target=keep_predicting)
        traffic.start()
        try:
            staging = tmp_path / "v2"
            write_classifier(staging, seed=1)
            os.replace(staging, classifier_repo / "clf" / "2")
            wait_for(lambda: "2" in answers[-1:], 60, "version 2 to serve")
        finally:
            stop.set()
            traffic.join(timeout=30)
        # Every request was answered while version 2 was derived and checked: by version 1
        # until version 2 could serve, then by version 2.
        assert answers[0] == "1"
        assert answers == sorted(answers)
        block = described(client, "clf", "2")["optimized"]
        assert block["accepted"] is True
        assert block["reused"] is False
    assert len(cache_entries(cache)) == 2  # new files, new key


def test_a_change_to_the_files_of_a_version_derives_it_again(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    (classifier_repo / "clf" / "1" / "READY").touch()
    cache = tmp_path / "derived"
    server = start_server(classifier_repo, optimize_cache_dir=str(cache), settle_window_s=0.2)
    replacement = tmp_path / "replacement"
    write_classifier(replacement, seed=1)  # other weights, same shapes
    x = reference_rows(replacement)
    expected = classifier_logits(replacement, x).argmax(1)

    def classes(client: httpx.Client) -> np.ndarray:
        logits = np.array(predict(client, "clf", x.tolist())["outputs"]["logits"])
        found: np.ndarray = logits.argmax(1)
        return found

    with server.client() as client:
        assert described(client, "clf")["optimized"]["reused"] is False
        assert not np.array_equal(classes(client), expected)
        os.replace(replacement / "model.onnx", classifier_repo / "clf" / "1" / "model.onnx")
        wait_for(lambda: np.array_equal(classes(client), expected), 60, "the new files")
        # Derived from the new file, not taken from the cache for the old one. (Whether it
        # serves depends on the old reference.npz, which no longer suits the model.)
        assert described(client, "clf")["optimized"]["reused"] is False
    assert len(cache_entries(cache)) == 2


def test_a_derivation_past_its_timeout_leaves_the_original_serving(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    server = start_server(
        classifier_repo, optimize_cache_dir=str(tmp_path / "derived"), optimize_timeout_s=0.05
    )
    with server.client() as client:
        block = described(client, "clf")["optimized"]
        assert block["accepted"] is False
        assert "took longer than optimize_timeout_s = 0.05 s" in block["reason"]
        x = reference_rows(classifier_repo / "clf" / "1")
        served = np.array(predict(client, "clf", x.tolist())["outputs"]["logits"], np.float32)
    np.testing.assert_array_equal(served, classifier_logits(classifier_repo / "clf" / "1", x))
    assert cache_entries(tmp_path / "derived") == []  # a timeout is not a verdict


def test_an_unusable_cache_directory_leaves_the_original_serving(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    server = start_server(classifier_repo, optimize_cache_dir=str(blocked))
    with server.client() as client:
        block = described(client, "clf")["optimized"]
        assert block["accepted"] is False
        assert block["reason"].startswith("deriving failed: ")
        x = reference_rows(classifier_repo / "clf" / "1", rows=2)
        assert predict(client, "clf", x.tolist())["model_version"] == "1"


def test_an_invalid_optimize_value_fails_the_version_with_its_reason(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int4"\n')
    server = start_server(classifier_repo, optimize_cache_dir=str(tmp_path / "derived"))
    with server.client() as client:
        response = client.post("/models/clf/predict", json={"inputs": [[0.0] * 256]})
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert 'optimize must be one of "graph", "int8", "none", not \'int4\'' in message


def run_optimize(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "multiserve", "optimize", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_optimize_command_writes_a_version_that_serves_as_it_is(
    start_server: StartServer, classifier_repo: Path, tmp_path: Path
) -> None:
    source, target = classifier_repo / "clf" / "1", tmp_path / "staging" / "2"
    done = run_optimize(str(source), "--out", str(target), "--kind", "int8")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"int8 of {source}: accepted" in done.stdout
    assert "speed" in done.stdout
    assert "argmax agreement 100.00%" in done.stdout
    files = sorted(p.name for p in target.iterdir())
    assert files == [
        "config.toml",
        "derivation.json",
        "model.onnx",
        "model.onnx.sha256",
        "reference.npz",
    ]
    digest = hashlib.sha256((target / "model.onnx").read_bytes()).hexdigest()
    assert (target / "model.onnx.sha256").read_text().split()[0] == digest

    # Dropped into the repository, it serves as it is, even under a model directory that asks
    # for int8: it is not quantised again.
    (classifier_repo / "clf" / "config.toml").write_text('optimize = "int8"\n')
    os.replace(target, classifier_repo / "clf" / "2")
    server = start_server(classifier_repo, optimize_cache_dir=str(tmp_path / "derived"))
    with server.client() as client:
        version = described(client, "clf", "2")
        assert version["state"] == "ready"
        assert "optimized" not in version
        x = reference_rows(source)
        served = np.array(predict(client, "clf", x.tolist(), "2")["outputs"]["logits"])
    np.testing.assert_array_equal(served.argmax(1), classifier_logits(source, x).argmax(1))


def test_optimize_command_exit_statuses(classifier_repo: Path, tmp_path: Path) -> None:
    source = classifier_repo / "clf" / "1"
    rejected = run_optimize(
        str(source), "--out", str(tmp_path / "2"), "--kind", "int8", "--max-abs-error", "1e-6"
    )
    assert rejected.returncode == 1, rejected.stdout + rejected.stderr
    assert "REJECTED: max abs error" in rejected.stdout
    assert not (tmp_path / "2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["models"]  # no partial directory left

    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "model.onnx").write_bytes(b"taken")
    taken = run_optimize(str(source), "--out", str(tmp_path / "3"), "--kind", "graph")
    assert taken.returncode == 2
    assert "exists: choose a new directory" in taken.stderr

    empty = tmp_path / "empty" / "1"
    empty.mkdir(parents=True)
    nothing = run_optimize(str(empty), "--out", str(tmp_path / "4"), "--kind", "graph")
    assert nothing.returncode == 2
    assert "holds no model artifact" in nothing.stderr

    unsuited = run_optimize(str(source), "--out", str(tmp_path / "5"), "--kind", "onnx")
    assert unsuited.returncode == 1
    assert "backend 'onnx' cannot derive 'onnx'" in unsuited.stdout
