"""The ONNX load cache: a version's optimised graph is saved by its first load, reused by the
next ones, and never by a load of different files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from examples.make_models import scaled_onnx_bytes, write_mlp_onnx
from multiserve.backends import BackendRegistry
from multiserve.catalog import VersionRecord
from multiserve.derived import DerivedStore
from multiserve.loading import Loader, LocalFiles
from multiserve.memory import MemoryMeter
from multiserve.optimize import Optimizer
from multiserve.repository.local import LocalRepository
from multiserve.types import LoadedModel

X = np.array([[0.5, -1.0, 2.0, 0.25]], dtype=np.float32)


def _loader(store: DerivedStore, registry: BackendRegistry) -> Loader:
    return Loader(
        registry,
        LocalFiles(),
        MemoryMeter(1),
        default_device="cpu",
        warmup=False,
        optimizer=Optimizer(registry, store),
    )


def _load(loader: Loader, record: VersionRecord) -> tuple[str, np.ndarray]:
    model, _ = loader.load(record, False, 1)
    assert isinstance(model, LoadedModel)
    try:
        state = dict(model.describe())["session_cache"]  # type: ignore[attr-defined]
        output = np.asarray(model.predict({"x": X})["probabilities"])
    finally:
        model.close()
    return str(state), output


def test_the_optimised_graph_is_reused_and_invalidated_when_the_files_change(
    tmp_path: Path,
) -> None:
    registry = BackendRegistry()
    root = tmp_path / "models"
    write_mlp_onnx(root / "m" / "1" / "model.onnx", seed=1)
    repository = LocalRepository(root, registry)
    store = DerivedStore(tmp_path / "derived")
    loader = _loader(store, registry)

    [record] = repository.scan()
    first, expected = _load(loader, record)
    assert first == "saved"
    assert len(store.entries()) == 1
    [entry] = store.entries()
    assert (entry / "model.onnx").is_file()
    for _ in range(2):
        state, output = _load(loader, record)
        assert state == "hit"
        np.testing.assert_allclose(output, expected, rtol=1e-6)
    # A second server process (a restart) on the same store reuses it too.
    assert _load(_loader(store, registry), record)[0] == "hit"

    # New weights in the same place: a different key, never the old graph.
    write_mlp_onnx(root / "m" / "1" / "model.onnx", seed=7)
    os.utime(root / "m" / "1" / "model.onnx", (1, 1))
    [changed] = repository.scan()
    state, output = _load(loader, changed)
    assert state == "saved"
    assert not np.allclose(output, expected)
    assert len(store.entries()) == 2
    assert _load(loader, changed)[0] == "hit"


def test_options_are_part_of_the_key_and_a_version_can_opt_out(tmp_path: Path) -> None:
    registry = BackendRegistry()
    root = tmp_path / "models"
    write_mlp_onnx(root / "m" / "1" / "model.onnx", seed=1)
    store = DerivedStore(tmp_path / "derived")
    loader = _loader(store, registry)
    [record] = LocalRepository(root, registry).scan()
    assert _load(loader, record)[0] == "saved"

    (root / "m" / "1" / "config.toml").write_text('optimization = "basic"\n')
    [basic] = LocalRepository(root, registry).scan()
    assert _load(loader, basic)[0] == "saved"  # another level: another graph
    assert len(store.entries()) == 2

    (root / "m" / "1" / "config.toml").write_text("session_cache = false\n")
    [off] = LocalRepository(root, registry).scan()
    assert _load(loader, off)[0] == "off"
    assert len(store.entries()) == 2  # nothing written, nothing kept


def test_unset_only_small_versions_are_cached_and_true_caches_any(tmp_path: Path) -> None:
    """benchmarks/load_cache.py measured no gain from 3 MB up, and a first load that costs
    1.5-3x: unset, a version over 2 MiB is not cached; ``session_cache = true`` caches it."""
    registry = BackendRegistry()
    root = tmp_path / "models"
    (root / "big" / "1").mkdir(parents=True)
    (root / "big" / "1" / "model.onnx").write_bytes(scaled_onnx_bytes(2.0, 3 * 1024**2))
    store = DerivedStore(tmp_path / "derived")
    loader = _loader(store, registry)

    def state() -> str:
        [record] = LocalRepository(root, registry).scan()
        model, _ = loader.load(record, False, 1)
        try:
            answer = np.asarray(model.predict({"x": X})["y"])  # type: ignore[union-attr]
            np.testing.assert_allclose(answer, X * 2)
            return str(dict(model.describe())["session_cache"])  # type: ignore[union-attr]
        finally:
            model.close()

    assert state() == "off"
    assert store.entries() == []
    (root / "big" / "1" / "config.toml").write_text("session_cache = true\n")
    assert state() == "saved"
    assert state() == "hit"
