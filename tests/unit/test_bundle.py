"""`multiserve bundle`'s core: choosing versions, the manifest, and refusing a bundle whose files
differ from it in any way."""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path

import pytest

from examples.make_models import write_mlp_onnx
from multiserve import __version__
from multiserve.bundle import (
    CONFIG,
    MANIFEST,
    BundleError,
    Selector,
    make_bundle,
    verify_bundle,
)
from multiserve.errors import SettingsError


@pytest.fixture
def bundle(model_repo: Path, tmp_path: Path) -> Path:
    (model_repo / "mlp/2/model.onnx").chmod(0o600)
    out = tmp_path / "bundle"
    make_bundle(str(model_repo), out)
    return out


def test_a_bundle_holds_each_models_latest_version_and_a_checksum_of_every_file(
    model_repo: Path, bundle: Path
) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["multiserve_version"] == __version__
    versions = {(m["name"], m["version"]) for m in manifest["models"]}
    assert versions == {
        ("mlp", 2),
        ("adder", 1),
        ("counter", 1),
        ("scaler", 1),
        ("regressor", 1),
        ("iris", 1),
    }
    mlp = next(m for m in manifest["models"] if m["name"] == "mlp")
    assert mlp["artifact"] == "model.onnx"
    assert mlp["backend"] == "onnx"
    assert mlp["size_bytes"] == (model_repo / "mlp/2/model.onnx").stat().st_size
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {
        MANIFEST
    }
    assert {f["path"] for f in manifest["files"]} == on_disk
    for entry in manifest["files"]:
        data = (bundle / entry["path"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    # The bundled files are the repository's, byte for byte; version 1 of mlp stays out.
    assert (bundle / "models/mlp/2/model.onnx").read_bytes() == (
        model_repo / "mlp/2/model.onnx"
    ).read_bytes()
    assert (bundle / "models/scaler/1/config.toml").exists()
    assert not (bundle / "models/mlp/1").exists()
    # Readable by any user (an image's server is not the user that made the bundle).
    assert {oct(p.stat().st_mode & 0o777) for p in bundle.rglob("*") if p.is_file()} == {"0o644"}
    assert {oct(p.stat().st_mode & 0o777) for p in [bundle, *bundle.rglob("*")] if p.is_dir()} == {
        "0o755"
    }
    config = tomllib.loads((bundle / CONFIG).read_text())
    assert config == {"watch": False, "rescan_interval_s": 0.0, "settle_window_s": 0.0}
    assert verify_bundle(bundle).multiserve_version == __version__


def test_only_picks_models_and_versions(model_repo: Path, tmp_path: Path) -> None:
    (model_repo / "mlp" / "config.toml").write_text("inference_threads = 2\n")
    manifest = make_bundle(
        str(model_repo),
        tmp_path / "b",
        [Selector.parse("mlp:1"), Selector.parse("mlp:2"), Selector.parse("adder")],
    )
    assert [(m.name, m.version) for m in manifest.models] == [
        ("adder", 1),
        ("mlp", 1),
        ("mlp", 2),
    ]
    # The model-wide config.toml applies to the bundled versions as it did in the repository.
    assert (tmp_path / "b/models/mlp/config.toml").read_text() == "inference_threads = 2\n"
    assert "models/mlp/config.toml" in {f.path for f in manifest.files}


def test_the_latest_version_that_can_load_is_bundled_not_a_broken_newer_one(
    model_repo: Path, tmp_path: Path
) -> None:
    broken = model_repo / "mlp" / "3"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"x")
    (broken / "config.toml").write_text("not = [toml")
    manifest = make_bundle(str(model_repo), tmp_path / "b", [Selector.parse("mlp")])
    assert [(m.name, m.version) for m in manifest.models] == [("mlp", 2)]
    with pytest.raises(BundleError, match="not valid TOML"):
        make_bundle(str(model_repo), tmp_path / "c", [Selector.parse("mlp:3")])


@pytest.mark.parametrize(
    ("only", "message"),
    [
        ("nope", "no model 'nope'"),
        ("mlp:7", "mlp has no version 7 \\(versions: 1, 2\\)"),
    ],
)
def test_asking_for_what_is_not_there_is_an_error(
    model_repo: Path, tmp_path: Path, only: str, message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        make_bundle(str(model_repo), tmp_path / "b", [Selector.parse(only)])
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle-")]


@pytest.mark.parametrize("text", ["bad name!", "mlp:01", "mlp:x", ":3"])
def test_invalid_selectors_are_refused(text: str) -> None:
    with pytest.raises(SettingsError, match="--only"):
        Selector.parse(text)


def test_an_existing_non_empty_directory_is_never_overwritten(
    model_repo: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="not empty"):
        make_bundle(str(model_repo), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    make_bundle(str(model_repo), empty)
    verify_bundle(empty)


def test_a_changed_byte_is_refused_naming_the_file(bundle: Path) -> None:
    artifact = bundle / "models/mlp/2/model.onnx"
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    artifact.write_bytes(bytes(data))
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle)
    assert "models/mlp/2/model.onnx: checksum mismatch (sha256" in str(caught.value)
    assert "adder" not in str(caught.value)


def test_a_changed_config_is_refused(bundle: Path) -> None:
    (bundle / CONFIG).write_text("watch = true\nsettle_window_s = 0.0\n")
    with pytest.raises(BundleError, match=f"{CONFIG}: checksum mismatch"):
        verify_bundle(bundle)


def test_a_missing_file_is_refused_naming_it(bundle: Path) -> None:
    (bundle / "models/scaler/1/config.toml").unlink()
    with pytest.raises(BundleError, match=r"models/scaler/1/config.toml: missing .*checksum"):
        verify_bundle(bundle)


def test_an_extra_file_is_refused_naming_it(bundle: Path) -> None:
    extra = bundle / "models/mlp/3"
    extra.mkdir()
    write_mlp_onnx(extra / "model.onnx", seed=9)
    with pytest.raises(BundleError, match=r"models/mlp/3/model.onnx: extra file.*no checksum"):
        verify_bundle(bundle)


def test_a_symbolic_link_is_refused(bundle: Path, tmp_path: Path) -> None:
    target = bundle / "models/mlp/2/model.onnx"
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(outside, target)
    with pytest.raises(BundleError, match=r"models/mlp/2/model.onnx: not a regular file"):
        verify_bundle(bundle)


def test_a_directory_without_a_manifest_is_not_a_bundle(model_repo: Path) -> None:
    with pytest.raises(BundleError, match=r"not a bundle: it has no manifest.json"):
        verify_bundle(model_repo)


def test_a_corrupt_manifest_is_refused(bundle: Path) -> None:
    (bundle / MANIFEST).write_text("{")
    with pytest.raises(BundleError, match=r"manifest.json cannot be read"):
        verify_bundle(bundle)


def test_every_problem_is_listed_at_once(bundle: Path) -> None:
    (bundle / "models/adder/1/model.onnx").write_bytes(b"changed")
    (bundle / "models/counter/1/model.onnx").unlink()
    (bundle / "models/extra").write_text("x")
    with pytest.raises(BundleError) as caught:
        verify_bundle(bundle)
    message = str(caught.value)
    assert "checksum verification" in message
    for fragment in ("models/adder/1", "models/counter/1", "models/extra"):
        assert fragment in message
