"""The pure parts of optimisation: config.toml keys, the comparison of answers, the verdict, and
the keys of the derived-model cache."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from multiserve.check import (
    DEFAULT_TOLERANCE,
    Figures,
    Mismatch,
    Tolerance,
    compare,
    incompatibility,
    judge,
    synthetic_inputs,
    time_pair,
)
from multiserve.derived import checksum_mismatch, derivation_key, directory_digest, write_checksum
from multiserve.optimize import split_options
from multiserve.types import ModelMetadata, TensorSpec


def metadata(*outputs: TensorSpec, inputs: tuple[TensorSpec, ...] = ()) -> ModelMetadata:
    return ModelMetadata(inputs or (TensorSpec("x", "float32", (-1, 4)),), outputs)


LOGITS = TensorSpec("logits", "float32", (-1, 3))


def test_one_line_turns_optimisation_on_and_the_rest_goes_to_the_backend() -> None:
    plan, rest = split_options({"optimize": "int8", "device": "cpu", "intra_op_threads": 2})
    assert plan is not None
    assert plan.steps == ("int8",)
    assert rest == {"device": "cpu", "intra_op_threads": 2}
    assert plan.tolerance("int8") == DEFAULT_TOLERANCE["int8"]


def test_an_export_comes_before_an_optimisation_and_tolerances_override_defaults() -> None:
    plan, _ = split_options({"optimize": "int8", "export": "onnx", "min_speedup": 2})
    assert plan is not None
    assert plan.steps == ("onnx", "int8")
    assert plan.tolerance("int8").min_speedup == 2.0
    assert plan.tolerance("int8").min_argmax_agreement == 0.99


def test_none_turns_off_what_a_model_directory_asked_for() -> None:
    assert split_options({"optimize": "none", "export": "none"}) == (None, {})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"optimize": "int4"}, 'optimize must be one of "graph", "int8", "none"'),
        ({"export": "tflite"}, 'export must be one of "onnx", "none"'),
        ({"optimize": "int8", "max_abs_error": "small"}, "max_abs_error must be a number"),
        ({"optimize": "int8", "min_argmax_agreement": 99}, "from 0 to 1"),
        ({"optimize": "int8", "min_speedup": -1}, "cannot be negative"),
        ({"optimize": "int8", "max_rel_error": True}, "must be a number"),
        ({"min_speedup": 1.5}, "neither optimize nor export"),
    ],
)
def test_invalid_values_are_refused_with_the_key(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_options(options)


def test_compare_measures_errors_relative_to_each_outputs_scale() -> None:
    expected = {"logits": np.array([[100.0, 0.0, -100.0], [1.0, 2.0, 3.0]], np.float32)}
    actual = {"logits": np.array([[100.5, 0.0, -100.0], [1.0, 2.0, 3.0]], np.float32)}
    found = compare(metadata(LOGITS), expected, actual)
    assert found.max_abs_error == pytest.approx(0.5)
    assert found.max_rel_error == pytest.approx(0.005)
    assert found.argmax_agreement == 1.0


def test_compare_counts_rows_whose_top_class_changed() -> None:
    expected = {"logits": np.array([[3, 2, 1], [1, 2, 3], [0, 5, 0], [9, 0, 0]], np.float32)}
    actual = {"logits": np.array([[2, 3, 1], [1, 2, 3], [0, 5, 0], [9, 0, 0]], np.float32)}
    assert compare(metadata(LOGITS), expected, actual).argmax_agreement == 0.75


def test_compare_treats_integer_outputs_as_labels_and_nan_as_equal_only_to_nan() -> None:
    labels = TensorSpec("label", "int64", (-1,))
    scores = TensorSpec("score", "float32", (-1,))
    expected = {"label": np.array([1, 2, 3, 4]), "score": np.array([np.nan, 1.0, np.inf, 2.0])}
    same = {"label": np.array([1, 2, 3, 5]), "score": np.array([np.nan, 1.0, np.inf, 2.0])}
    found = compare(metadata(labels, scores), expected, same)
    assert found.argmax_agreement == 0.75
    assert found.max_abs_error == 1.0  # the label 4 -> 5
    broken = {"label": expected["label"], "score": np.array([0.0, 1.0, np.inf, 2.0])}
    assert compare(metadata(labels, scores), expected, broken).max_abs_error == math.inf


def test_compare_refuses_missing_or_reshaped_outputs() -> None:
    expected = {"logits": np.zeros((2, 3), np.float32)}
    with pytest.raises(Mismatch, match="returned no output 'logits'"):
        compare(metadata(LOGITS), expected, {})
    with pytest.raises(Mismatch, match=r"shape \[3, 2\] from the derived model"):
        compare(metadata(LOGITS), expected, {"logits": np.zeros((3, 2), np.float32)})


def figures(**measured: float | None) -> Figures:
    return Figures("int8", speedup=2.0, **measured)  # type: ignore[arg-type]


def test_judge_accepts_within_every_bound_and_faster() -> None:
    accepted, reason = judge(figures(argmax_agreement=1.0), DEFAULT_TOLERANCE["int8"])
    assert accepted
    assert reason == "2.00x the original's speed, argmax agreement 100.00% >= 99.00%"


@pytest.mark.parametrize(
    ("measured", "tolerance", "why"),
    [
        ({"argmax_agreement": 0.9}, Tolerance(min_argmax_agreement=0.99), "under min_argmax"),
        ({"max_abs_error": 0.1}, Tolerance(max_abs_error=0.01), "over max_abs_error = 0.01"),
        ({"max_rel_error": 0.1}, Tolerance(max_rel_error=0.01), "over max_rel_error = 0.01"),
        ({"max_rel_error": 0.0}, Tolerance(max_rel_error=0.01, min_speedup=3), "under min_speed"),
        # A regression model has no classes: an argmax bound alone cannot pass it.
        ({"max_abs_error": 0.0}, Tolerance(min_argmax_agreement=0.99), "no tolerance applies"),
    ],
)
def test_judge_rejects_with_the_reason(
    measured: dict[str, float], tolerance: Tolerance, why: str
) -> None:
    accepted, reason = judge(figures(**measured), tolerance)
    assert not accepted
    assert why in reason


def test_judge_passes_on_an_error_as_the_reason() -> None:
    failed = Figures("onnx", error="deriving onnx failed: RuntimeError: unsupported operator")
    assert judge(failed, DEFAULT_TOLERANCE["onnx"]) == (False, failed.error)


def test_a_derived_model_must_take_every_input_the_original_takes() -> None:
    original = metadata(LOGITS)
    fixed_batch = metadata(LOGITS, inputs=(TensorSpec("x", "float32", (1, 4)),))
    renamed = metadata(TensorSpec("output_0", "float32", (-1, 3)))
    retyped = metadata(LOGITS, inputs=(TensorSpec("x", "float64", (-1, 4)),))
    assert incompatibility(original, original) is None
    assert "any size along dimension 0" in str(incompatibility(original, fixed_batch))
    assert "outputs are 'output_0'" in str(incompatibility(original, renamed))
    assert "input 'x' is float64" in str(incompatibility(original, retyped))
    # Fixing what the original leaves open is refused; the reverse is fine.
    assert incompatibility(fixed_batch, original) is None


def test_synthetic_inputs_fill_dynamic_dimensions_and_are_seeded() -> None:
    spec = ModelMetadata(
        (TensorSpec("ids", "int64", (-1, -1)), TensorSpec("x", "float32", (2, 3))), ()
    )
    first, second = synthetic_inputs(spec), synthetic_inputs(spec)
    assert first["ids"].shape == (32, 16)
    assert first["x"].shape == (2, 3)
    assert set(np.unique(first["ids"])) <= {0, 1}
    np.testing.assert_array_equal(first["x"], second["x"])


def test_time_pair_finds_the_faster_model() -> None:
    def slow(inputs: object) -> dict[str, np.ndarray]:
        np.linalg.svd(np.ones((120, 120)))
        return {}

    def fast(inputs: object) -> dict[str, np.ndarray]:
        return {}

    speedup, slow_seconds, fast_seconds = time_pair(slow, fast, {}, rounds=3)
    assert speedup > 1
    assert slow_seconds > fast_seconds


def test_a_changed_file_changes_the_key_and_a_touched_one_does_not(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"weights")
    (tmp_path / "config.toml").write_text('optimize = "int8"\n')
    first = directory_digest(tmp_path)
    os.utime(tmp_path / "model.onnx", (1, 1))  # same bytes, other mtime: same content
    assert directory_digest(tmp_path) == first
    (tmp_path / "model.onnx").write_bytes(b"weightz")
    assert directory_digest(tmp_path) != first
    key = derivation_key("int8:onnx", first, {"options": {}})
    assert key == derivation_key("int8:onnx", first, {"options": {}})
    assert key != derivation_key("graph:onnx", first, {"options": {}})
    assert key != derivation_key("int8:onnx", first, {"options": {"device": "cuda"}})


def test_checksum_sidecars_are_written_and_checked(tmp_path: Path) -> None:
    artifact = tmp_path / "model.onnx"
    artifact.write_bytes(b"weights")
    assert not checksum_mismatch(artifact)  # no sidecar: nothing to check
    write_checksum(artifact)
    assert not checksum_mismatch(artifact)
    artifact.write_bytes(b"tampered")
    assert checksum_mismatch(artifact)
