"""Drift statistics (multiserve.monitor) without a server."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest

from multiserve.monitor import DriftMonitor, DriftSettings, features_of
from multiserve.types import ModelMetadata, TensorSpec

FEATURES = 4
WINDOW = 1000


def _metadata(*specs: TensorSpec) -> ModelMetadata:
    return ModelMetadata(
        inputs=specs or (TensorSpec("x", "float32", (-1, FEATURES)),),
        outputs=(TensorSpec("y", "float32", (-1, 1)),),
    )


def _monitor(tmp_path: Path | None = None, **settings: float) -> DriftMonitor:
    drift = DriftSettings(**{"window": WINDOW, "reference_rows": 1000, **settings})  # type: ignore[arg-type]
    dirs = [tmp_path] if tmp_path is not None else []
    return DriftMonitor("m", 1, _metadata(), drift, lambda: dirs, rng=random.Random(0))


def _feed(monitor: DriftMonitor, rows: np.ndarray, per_request: int = 8) -> None:
    for start in range(0, len(rows), per_request):
        chunk = rows[start : start + per_request]
        monitor.observe([({"x": chunk}, {"y": chunk[:, :1]})])


def _normal(rng: np.random.Generator, rows: int) -> np.ndarray:
    return rng.normal(size=(rows, FEATURES)).astype(np.float32)


def test_in_distribution_traffic_stays_below_the_threshold() -> None:
    rng = np.random.default_rng(1)
    monitor = _monitor()
    _feed(monitor, _normal(rng, 1000))  # the reference: the first rows
    _feed(monitor, _normal(rng, 3000))
    report = monitor.report()
    assert report.reference_source == "first_rows"
    assert report.reference_rows == 1000
    assert report.window_rows == WINDOW
    assert not report.drift
    assert len(report.features) == FEATURES
    assert max(s.psi or 0 for s in report.features) < 0.1
    assert max(s.ks or 0 for s in report.features) < 0.1


def test_a_shifted_feature_is_flagged_within_one_window_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rng = np.random.default_rng(2)
    monitor = _monitor()
    _feed(monitor, _normal(rng, 1000))
    _feed(monitor, _normal(rng, 1000))
    assert not monitor.report().drift
    shifted = _normal(rng, WINDOW)
    shifted[:, 2] += 2.0  # two standard deviations
    with caplog.at_level(logging.WARNING, "multiserve.monitor"):
        _feed(monitor, shifted)
    # Flagged by the worker's own periodic check, not only when asked.
    cached = monitor.cached()
    assert cached.drift
    assert cached.worst(1)[0].feature == "x[2]"
    drifting = [r.getMessage() for r in caplog.records if "inputs drifting" in r.getMessage()]
    assert len(drifting) == 1
    assert drifting[0].startswith("m version 1: inputs drifting: x[2] has PSI")
    report = monitor.report()
    assert report.drift
    assert report.since is not None
    worst = report.worst(1)[0]
    assert worst.feature == "x[2]"
    assert (worst.psi or 0) > 1.0
    assert (worst.ks or 0) > 0.5
    others = [s for s in report.features if s.feature != "x[2]"]
    assert all((s.psi or 0) < 0.2 for s in others)
    document = report.to_json()
    assert document["drift"] is True
    assert document["worst"][0]["feature"] == "x[2]"
    assert document["inputs"]["x"]["score"] == pytest.approx(worst.psi, abs=1e-5)
    # Back to normal: it stops drifting, and says so once.
    with caplog.at_level(logging.WARNING, "multiserve.monitor"):
        _feed(monitor, _normal(rng, WINDOW))
    assert not monitor.report().drift
    assert sum("no longer drifting" in r.getMessage() for r in caplog.records) == 1


def test_reference_from_file_applies_from_the_first_request(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "reference.npz", x=_normal(rng, 5000), unrelated=np.zeros(3))
    monitor = _monitor(tmp_path)
    shifted = _normal(rng, WINDOW)
    shifted[:, 0] -= 2.0
    _feed(monitor, shifted)
    report = monitor.report()
    assert report.reference_source == f"file:{tmp_path / 'reference.npz'}"
    assert report.reference_rows == 5000
    assert report.drift
    assert report.worst(1)[0].feature == "x[0]"


def test_a_reference_file_without_the_inputs_falls_back_to_the_first_rows(tmp_path: Path) -> None:
    np.savez(tmp_path / "reference.npz", other=np.zeros((10, 4)))
    monitor = _monitor(tmp_path)
    _feed(monitor, _normal(np.random.default_rng(4), 1500))
    report = monitor.report()
    assert report.reference_source == "first_rows"
    assert report.note is not None
    assert "no array named after an input" in report.note


def test_no_reference_rows_and_no_file_monitors_nothing() -> None:
    monitor = _monitor(reference_rows=0)
    _feed(monitor, _normal(np.random.default_rng(5), 2000))
    report = monitor.report()
    assert report.reference_source == "none"
    assert report.features == []
    assert not report.drift


def test_categorical_inputs_use_category_frequencies() -> None:
    rng = np.random.default_rng(6)
    metadata = _metadata(TensorSpec("ids", "int64", (-1,)))
    monitor = DriftMonitor("m", 1, metadata, DriftSettings(window=500, reference_rows=500))
    usual = rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1], size=1500)
    for start in range(0, 1500, 10):
        monitor.observe([({"ids": usual[start : start + 10]}, {})])
    assert not monitor.report().drift
    unusual = rng.choice([3, 7], size=500)  # 7 was never seen
    for start in range(0, 500, 10):
        monitor.observe([({"ids": unusual[start : start + 10]}, {})])
    report = monitor.report()
    assert report.drift
    (stats,) = report.features
    assert stats.kind == "categorical"
    assert stats.ks is None
    assert (stats.psi or 0) > 1


def test_features_of_each_rank() -> None:
    assert [n for n, _ in features_of("x", np.zeros((5, 3)))] == ["x[0]", "x[1]", "x[2]"]
    assert [n for n, _ in features_of("x", np.zeros(5))] == ["x"]
    ((name, values),) = features_of("img", np.arange(2 * 3 * 4).reshape(2, 3, 4))
    assert name == "mean(img)"
    assert values.tolist() == [5.5, 17.5]
    assert features_of("s", np.array(3.0)) == []


def test_sample_rate_observes_a_fraction_of_requests() -> None:
    monitor = _monitor(sample_rate=0.25, reference_rows=100_000)
    rows = _normal(np.random.default_rng(7), 8000)
    _feed(monitor, rows, per_request=1)
    taken = monitor._collected_rows
    assert 1600 < taken < 2400


def test_inputs_the_model_does_not_declare_are_ignored() -> None:
    monitor = _monitor()
    rng = np.random.default_rng(8)
    for _ in range(200):
        monitor.observe([({"x": _normal(rng, 10), "evil{label}": np.zeros((10, 2))}, {})])
    report = monitor.report()
    assert {s.input for s in report.features} == {"x"}


def test_rows_past_the_reference_in_the_same_batch_start_the_window() -> None:
    monitor = _monitor(reference_rows=100)
    rows = _normal(np.random.default_rng(9), 400)
    monitor.observe([({"x": rows[:250]}, {}), ({"x": rows[250:]}, {})])
    report = monitor.report()
    assert report.reference_rows == 100
    assert report.window_rows == 300


def test_queued_requests_are_taken_after_a_while_without_being_asked() -> None:
    monitor = _monitor(reference_rows=10)
    rows = _normal(np.random.default_rng(10), 20)
    monitor.observe([({"x": rows[:5]}, {})])  # queued: fewer than BATCH_JOBS requests
    assert monitor.cached().reference_rows == 0
    monitor._flushed_at -= 1.0  # as if FLUSH_S had passed
    monitor.observe([({"x": rows[5:]}, {})])
    assert monitor.cached().reference_source == "first_rows"
    assert monitor.stale  # the window's 10 rows are in, not yet checked
    assert monitor.report().window_rows == 10
    assert not monitor.stale
