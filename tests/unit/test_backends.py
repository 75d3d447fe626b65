from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from multiserve.backends import BackendRegistry
from multiserve.errors import BackendNotInstalled, ModelLoadFailed
from tests.npz_backend import ENTRY_POINT


def test_missing_known_backend_names_its_distribution() -> None:
    with pytest.raises(BackendNotInstalled, match="pip install multiserve-torch"):
        BackendRegistry([]).get("torch")


def test_missing_unknown_backend_is_explained() -> None:
    with pytest.raises(BackendNotInstalled, match="backend 'tensorrt' is not installed"):
        BackendRegistry([]).get("tensorrt")


def test_broken_backend_is_a_load_error_not_a_crash() -> None:
    broken = EntryPoint(
        name="broken", value="no_such_module_anywhere:Backend", group="multiserve.backends"
    )
    with pytest.raises(ModelLoadFailed, match="failed to import: ModuleNotFoundError"):
        BackendRegistry([broken]).get("broken")


def test_not_a_backend_is_refused() -> None:
    wrong = EntryPoint(name="wrong", value="pathlib:PurePath", group="multiserve.backends")
    with pytest.raises(ModelLoadFailed, match="does not implement the Backend protocol"):
        BackendRegistry([wrong]).get("wrong")


def test_backends_are_instantiated_once() -> None:
    registry = BackendRegistry([ENTRY_POINT])
    assert registry.get("npz") is registry.get("npz")


def test_detection_by_artifact_then_by_third_party_backend(tmp_path: Path) -> None:
    registry = BackendRegistry([ENTRY_POINT])
    assert registry.detect(tmp_path, ["model.onnx", "config.toml"]) == ("onnx", "model.onnx")
    assert registry.detect(tmp_path, ["model.pt2"]) == ("torch", "model.pt2")
    assert registry.detect(tmp_path, ["weights.bin"]) is None
    (tmp_path / "model.npz").write_bytes(b"")
    assert registry.detect(tmp_path, ["model.npz"]) == ("npz", "")
    with pytest.raises(ValueError, match="more than one model artifact"):
        registry.detect(tmp_path, ["model.pt", "model.pt2"])


def test_a_predictor_beside_a_model_file_is_the_code_that_serves_it(tmp_path: Path) -> None:
    registry = BackendRegistry([])
    found = registry.detect(tmp_path, ["model.onnx", "predictor.py", "tokenizer.json"])
    assert found == ("python", "predictor.py")


class CodeRunningBackend:
    """A third-party backend whose loading runs repository code, and says so."""

    name = "scripts"
    executes_repository_code = True

    def can_load(self, version_dir: Path) -> bool:
        return (version_dir / "script.py").is_file()

    def load(self, version_dir: Path, options: object) -> None:
        raise AssertionError("never loaded in these tests")


def test_repository_code_is_refused_unless_allowed(tmp_path: Path) -> None:
    scripts = EntryPoint(
        name="scripts",
        value="tests.unit.test_backends:CodeRunningBackend",
        group="multiserve.backends",
    )
    registry = BackendRegistry([scripts, ENTRY_POINT])
    refusal = registry.refusal("python", "predictor.py")
    assert refusal is not None
    assert "--allow-python-predictors" in refusal
    # Decided by the artifact's name: the python backend need not even be installed.
    assert "python" not in registry.names()
    assert registry.refusal("onnx", "model.onnx") is None
    assert registry.refusal("npz", None) is None
    assert registry.refusal("scripts", None) == refusal
    assert registry.refusal("not-installed", None) is None  # its load says what is missing
    registry.allow_repository_code = True
    assert registry.refusal("python", "predictor.py") is None
    assert registry.refusal("scripts", None) is None
