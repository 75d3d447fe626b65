"""Bundles: chosen model versions frozen into a directory for the model-in-image pattern.

A bundle is ``models/`` (a repository holding only the chosen versions), ``multiserve.toml``
(the server settings it is meant to be served with: no watching, no settle window) and
``manifest.json``, which records each model version and the size and SHA-256 of every other
file. `verify_bundle` refuses a bundle with a changed, missing or extra file, so what serves is
exactly what was bundled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from multiserve import __version__
from multiserve.backends import BackendRegistry
from multiserve.catalog import VersionRecord
from multiserve.errors import SettingsError
from multiserve.repository.bucket import BucketOptions, BucketRepository, is_bucket_url
from multiserve.repository.disk_cache import DiskCache
from multiserve.repository.layout import CONFIG_FILE, is_valid_name, parse_version
from multiserve.repository.local import LocalRepository

MANIFEST = "manifest.json"
CONFIG = "multiserve.toml"
MODELS = "models"
FORMAT = 1
_SERVER_CONFIG = """\
# Written by `multiserve bundle`: the settings `multiserve serve --bundle DIR` serves this
# bundle with. Its models are frozen: nothing watches them, and every file is checked against
# manifest.json before the server starts, so no settle window is needed either, nor periodic
# rescans. Other settings come from MULTISERVE_* variables and flags, as usual.
watch = false
rescan_interval_s = 0.0
settle_window_s = 0.0
"""


class BundleError(Exception):
    """A bundle cannot be made, or a directory is not an intact bundle."""


@dataclass(frozen=True, slots=True)
class Selector:
    """``NAME`` (its latest version) or ``NAME:VERSION``, as given to ``--only``."""

    name: str
    version: int | None

    @classmethod
    def parse(cls, text: str) -> Selector:
        name, _, version = text.partition(":")
        if not is_valid_name(name):
            raise SettingsError(
                f"--only {text!r}: {name!r} is not a model name ([A-Za-z0-9][A-Za-z0-9_.-]*)"
            )
        if not version:
            return cls(name, None)
        number = parse_version(version)
        if number is None:
            raise SettingsError(f"--only {text!r}: {version!r} is not a version number")
        return cls(name, number)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}:{self.version}"


@dataclass(frozen=True, slots=True)
class BundledFile:
    path: str  # relative to the bundle, with forward slashes
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class BundledVersion:
    name: str
    version: int
    backend: str | None
    artifact: str | None
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Manifest:
    multiserve_version: str
    source: str
    models: tuple[BundledVersion, ...]
    files: tuple[BundledFile, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "multiserve_version": self.multiserve_version,
            "source": self.source,
            "models": [
                {
                    "name": m.name,
                    "version": m.version,
                    "backend": m.backend,
                    "artifact": m.artifact,
                    "size_bytes": m.size_bytes,
                }
                for m in self.models
            ],
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a multiserve bundle manifest of format {FORMAT}")
        models = tuple(
            BundledVersion(
                str(m["name"]),
                int(m["version"]),
                m.get("backend"),
                m.get("artifact"),
                int(m["size_bytes"]),
            )
            for m in data["models"]
        )
        files = tuple(
            BundledFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in data["files"]
        )
        return cls(str(data["multiserve_version"]), str(data.get("source", "")), models, files)


def sha256_of(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# --- making a bundle ----------------------------------------------------------------------------


def make_bundle(
    source: str,
    out: Path,
    only: Sequence[Selector] = (),
    registry: BackendRegistry | None = None,
    bucket: BucketOptions | None = None,
) -> Manifest:
    """Freeze versions of the repository at ``source`` (a directory or a bucket URL) into the
    new directory ``out``: each model's latest version, or the ``only`` ones. The bundle is
    written beside ``out`` under a temporary name and renamed when whole, so a failure leaves
    nothing behind."""
    # Bundling copies a predictor's code without running it: whether it may run is the serving
    # server's decision (--allow-python-predictors), not the bundle's.
    registry = registry if registry is not None else BackendRegistry(allow_repository_code=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"--out {str(out)!r} exists and is not empty: choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".bundle-", dir=out.parent) as staging_name:
        staging = Path(staging_name)
        if is_bucket_url(source):
            downloads = DiskCache(staging / ".downloads", 0)
            try:
                repository: LocalRepository | BucketRepository = BucketRepository(
                    source, registry, downloads, bucket or BucketOptions(), 0.0
                )
                repository.scan()  # a bucket version counts as complete once two listings agree
                records = repository.scan()
            except Exception as exc:
                raise BundleError(f"cannot list {source!r}: {type(exc).__name__}: {exc}") from None
        else:
            root = Path(source).expanduser()
            if not root.is_dir():
                raise BundleError(f"--models {source!r} is not a directory")
            repository = LocalRepository(root, registry)
            records = repository.scan()
        chosen = select_versions(records, only)
        bundle = staging / "bundle"
        models: list[BundledVersion] = []
        for record in chosen:
            target = bundle / MODELS / record.name / str(record.version)
            try:
                files = repository.materialize(record)
            except Exception as exc:
                raise BundleError(
                    f"{record.name} version {record.version}: cannot be read: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            shutil.copytree(files, target)
            size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
            models.append(
                BundledVersion(record.name, record.version, record.backend, record.artifact, size)
            )
        for name in sorted({record.name for record in chosen}):
            config = _model_config(repository, name)
            if config is not None:
                (bundle / MODELS / name / CONFIG_FILE).write_bytes(config)
        (bundle / CONFIG).write_text(_SERVER_CONFIG)
        manifest = Manifest(
            __version__, source, tuple(models), tuple(_hash_tree(bundle, _walk(bundle)))
        )
        (bundle / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
        _make_readable(bundle)
        if out.exists():
            _move_into(bundle, out)
        else:
            os.replace(bundle, out)
    return manifest


def select_versions(
    records: Iterable[VersionRecord], only: Sequence[Selector]
) -> list[VersionRecord]:
    """The versions a bundle takes: for each model (or each ``only`` selector) its highest
    version that nothing is known to be wrong with, or the version named."""
    by_model: dict[str, dict[int, VersionRecord]] = {}
    for record in records:
        by_model.setdefault(record.name, {})[record.version] = record
    selectors = list(only) or [Selector(name, None) for name in sorted(by_model)]
    chosen: dict[tuple[str, int], VersionRecord] = {}
    for selector in selectors:
        versions = by_model.get(selector.name)
        if not versions:
            known = ", ".join(sorted(by_model)) or "none"
            raise BundleError(f"--only {selector}: no model {selector.name!r} (models: {known})")
        record = _choose(selector, versions)
        chosen[record.key] = record
    return [chosen[key] for key in sorted(chosen)]


def _choose(selector: Selector, versions: dict[int, VersionRecord]) -> VersionRecord:
    if selector.version is None:
        usable = [r for _, r in sorted(versions.items()) if _unusable(r) is None]
        if not usable:
            reasons = "; ".join(f"version {v}: {_unusable(r)}" for v, r in sorted(versions.items()))
            raise BundleError(f"{selector.name} has no version to bundle ({reasons})")
        return usable[-1]
    record = versions.get(selector.version)
    if record is None:
        listed = ", ".join(str(v) for v in sorted(versions))
        raise BundleError(
            f"--only {selector}: {selector.name} has no version {selector.version} "
            f"(versions: {listed})"
        )
    problem = _unusable(record)
    if problem is not None:
        raise BundleError(f"--only {selector}: {problem}")
    return record


def _unusable(record: VersionRecord) -> str | None:
    if record.problem is not None:
        return record.problem
    if not record.marker and record.changed_at == float("inf"):
        return "still being uploaded (its listing changed between two polls)"
    return None


def _model_config(repository: LocalRepository | BucketRepository, name: str) -> bytes | None:
    """The model-wide config.toml, which applies to every version of the model."""
    return repository.read_model_file(name, CONFIG_FILE)


def _make_readable(root: Path) -> None:
    """Files 0644 and folders 0755, whatever the umask or the source's modes: an image copies
    the bundle as root's, and the server reads it as another user."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _move_into(bundle: Path, out: Path) -> None:
    # ``out`` is an existing empty directory (a mount point, say): fill it instead.
    for child in bundle.iterdir():
        os.replace(child, out / child.name)


# --- checking a bundle --------------------------------------------------------------------------


def verify_bundle(root: Path) -> Manifest:
    """The bundle's manifest, once every file has been checked against it: same size, same
    SHA-256, none missing, none added. Raises `BundleError` naming every file that differs."""
    manifest_path = root / MANIFEST
    try:
        manifest = Manifest.from_json(json.loads(manifest_path.read_text()))
    except FileNotFoundError:
        raise BundleError(
            f"{root} is not a bundle: it has no {MANIFEST} (make one with `multiserve bundle`)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{manifest_path} cannot be read: {exc}") from None
    problems: list[str] = []
    listed = {f.path: f for f in manifest.files}
    present = set()
    to_hash: list[str] = []
    for relative in _walk(root, problems):
        if relative == MANIFEST:
            continue
        present.add(relative)
        expected = listed.get(relative)
        if expected is None:
            problems.append(f"{relative}: extra file, not in {MANIFEST} (no checksum for it)")
            continue
        path = root / relative
        size = path.stat().st_size
        if size != expected.size:
            problems.append(
                f"{relative}: checksum mismatch (size {size} bytes, manifest says {expected.size})"
            )
            continue
        to_hash.append(relative)
    try:
        digests = _digests(root, to_hash)
    except OSError as exc:
        raise BundleError(f"bundle {root}: a file cannot be read for its checksum: {exc}") from None
    for relative, digest in zip(to_hash, digests, strict=True):
        if digest != listed[relative].sha256:
            problems.append(
                f"{relative}: checksum mismatch (sha256 {digest}, manifest says "
                f"{listed[relative].sha256})"
            )
    for relative in sorted(set(listed) - present):
        problems.append(f"{relative}: missing (listed in {MANIFEST} with its checksum)")
    if problems:
        shown = problems[:20]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more")
        raise BundleError(
            f"bundle {root} failed its checksum verification:\n  " + "\n  ".join(shown)
        )
    return manifest


def _walk(root: Path, problems: list[str] | None = None) -> list[str]:
    """Every file under ``root``, relative, sorted. Anything but a regular file (a symbolic
    link, a device) is reported as a problem, or refused when making a bundle."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        directory = Path(dirpath)
        for name in [*filenames, *(d for d in dirnames if (directory / d).is_symlink())]:
            path = directory / name
            relative = PurePosixPath(path.relative_to(root).as_posix()).as_posix()
            mode = path.lstat().st_mode
            if not stat.S_ISREG(mode):
                why = f"{relative}: not a regular file (a link or a device cannot be checksummed)"
                if problems is None:
                    raise BundleError(why)
                problems.append(why)
                continue
            found.append(relative)
    return sorted(found)


def _hash_tree(root: Path, relatives: Sequence[str]) -> list[BundledFile]:
    return [
        BundledFile(relative, (root / relative).stat().st_size, digest)
        for relative, digest in zip(relatives, _digests(root, relatives), strict=True)
    ]


def _digests(root: Path, relatives: Sequence[str]) -> list[str]:
    """SHA-256 of each file, several files at once (hashlib lets go of the GIL while it
    hashes), in the order given."""
    workers = max(1, min(8, os.cpu_count() or 1, len(relatives)))
    with ThreadPoolExecutor(workers, thread_name_prefix="bundle-sha256") as pool:
        return list(pool.map(lambda relative: sha256_of(root / relative), relatives))
