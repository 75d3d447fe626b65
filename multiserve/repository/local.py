"""A model repository in a local directory: scanned into catalog records, and watched."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from watchfiles import Change, awatch

from multiserve.backends import BackendRegistry
from multiserve.catalog import LATEST, VersionRecord
from multiserve.repository import RepositoryUnavailable
from multiserve.repository.classify import NO_ARTIFACT, classify
from multiserve.repository.layout import CONFIG_FILE, MARKER_FILE, is_valid_name, parse_version

logger = logging.getLogger("multiserve.repository")


class LocalRepository:
    def __init__(
        self, root: Path, registry: BackendRegistry, *, allow_external_symlinks: bool = False
    ) -> None:
        self.root = root
        self.registry = registry
        self.allow_external_symlinks = allow_external_symlinks
        self._absolute_root = os.path.abspath(root)
        self._warned: set[str] = set()
        self._last: dict[str, list[VersionRecord]] = {}

    def identity(self) -> tuple[int, int] | None:
        """The root directory's (device, inode), or None if it is missing: a watch follows the
        directory it was started on, so a different identity means watching again."""
        try:
            stat = os.stat(self.root)
        except OSError:
            return None
        return (stat.st_dev, stat.st_ino)

    def scan(self) -> list[VersionRecord]:
        """Every version directory under the root. Anything that is not a model or a version is
        skipped with one warning (once per path, however often it is scanned). Raises
        RepositoryUnavailable when the root itself cannot be listed (deleted, unmounted,
        unreadable): that is an outage, and must not read as a repository without models."""
        try:
            children = sorted(self.root.iterdir())
        except OSError as exc:
            raise RepositoryUnavailable(
                f"{self.root} cannot be listed: {exc.strerror or exc}"
            ) from None
        real_root = Path(os.path.realpath(self.root))
        records: list[VersionRecord] = []
        warnings: dict[str, str] = {}
        last: dict[str, list[VersionRecord]] = {}
        for model_dir in self._dirs(self.root, warnings, children):
            if not is_valid_name(model_dir.name):
                warnings[str(model_dir)] = (
                    "not a valid model name ([A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
                )
                continue
            try:
                version_dirs = sorted(model_dir.iterdir())
            except OSError as exc:
                # Unreadable for now: keep what it held rather than retire a serving model.
                warnings[str(model_dir)] = (
                    f"cannot be listed ({exc.strerror or exc}); keeping its last known versions"
                )
                kept = self._last.get(model_dir.name, [])
                last[model_dir.name] = kept
                records.extend(kept)
                continue
            model_config, model_problem = _read_config(model_dir / CONFIG_FILE)
            found: list[VersionRecord] = []
            for version_dir in self._dirs(model_dir, warnings, version_dirs):
                version = parse_version(version_dir.name)
                if version is None:
                    warnings[str(version_dir)] = (
                        "not a version (a positive integer without leading zeros)"
                    )
                    continue
                record = self._scan_version(
                    model_dir.name, version, version_dir, model_config, warnings, real_root
                )
                if record is not None:
                    if model_problem and record.problem is None:
                        record = dataclasses.replace(record, problem=model_problem)
                    found.append(record)
            last[model_dir.name] = found
            records.extend(found)
        self._last = last
        for path, why in warnings.items():
            if path not in self._warned:
                logger.warning("skipping %s: %s", path, why)
        self._warned = set(warnings)
        return records

    def holds(self, name: str, selector: str) -> bool:
        """Whether the root has a directory for this model (and version), scanned or not:
        a request for it is worth a rescan before it gets 404."""
        if not is_valid_name(name):
            return False
        if selector == LATEST:
            return (self.root / name).is_dir()
        version = parse_version(selector)
        return version is not None and (self.root / name / str(version)).is_dir()

    def _scan_version(
        self,
        name: str,
        version: int,
        version_dir: Path,
        model_config: dict[str, Any],
        warnings: dict[str, str],
        real_root: Path,
    ) -> VersionRecord | None:
        what = f"{name} version {version}"
        try:
            files = _files(version_dir)
        except OSError as exc:
            # Named for what it is: the directory, not a config.toml that may not exist.
            return _failed(name, version, version_dir, f"{what}: {_unreadable(exc)}")
        outside = None if self.allow_external_symlinks else _escapes(files, real_root)
        if outside is not None:
            link, target = outside
            return _failed(
                name,
                version,
                version_dir,
                f"{what}: {link.relative_to(version_dir)} is a symbolic link to {target}, outside "
                "the repository; set allow_external_symlinks = true to serve it",
            )
        version_config, problem = _read_config(version_dir / CONFIG_FILE)
        filenames = [p.name for p, _ in files]
        found = classify(
            self.registry, version_dir, filenames, model_config, version_config, problem
        )
        if not found.loadable:
            if files:
                warnings[str(version_dir)] = NO_ARTIFACT
            return None  # or an empty directory: a copy that has not started yet
        return VersionRecord(
            name=name,
            version=version,
            path=version_dir,
            backend=found.backend,
            artifact=found.artifact,
            options=found.options,
            problem=found.problem,
            fingerprint=_fingerprint(files),
            changed_at=max((_changed(stat) for _, stat in files), default=0.0),
            marker=any(p.name == MARKER_FILE for p, _ in files),
            size_bytes=sum(stat.st_size for _, stat in files),
            **found.serving(),
        )

    def _dirs(self, parent: Path, warnings: dict[str, str], children: list[Path]) -> list[Path]:
        dirs = []
        for child in children:
            if child.name.startswith(".") or child.name == CONFIG_FILE:
                continue
            try:
                is_dir = child.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                dirs.append(child)
            else:
                warnings[str(child)] = "not a directory"
        return dirs

    poll_interval_s: float | None = None  # event-driven: watched, not polled

    def materialize(self, record: VersionRecord) -> Path:
        return record.path

    def progress(self, record: VersionRecord) -> tuple[int, int] | None:
        return None

    def read_model_file(self, name: str, filename: str) -> bytes | None:
        """A file of the model's own directory (its config.toml), or None if there is none."""
        try:
            return (self.root / name / filename).read_bytes()
        except FileNotFoundError:
            return None

    async def changes(self, stop: threading.Event) -> AsyncIterator[None]:
        """Yields after each batch of file-system events under the root, until ``stop``. The
        watch follows the root directory it started on: see `identity`."""

        root = self._absolute_root

        def relevant(change: object, path: str) -> bool:
            # The state directory and other dot-directories at the top are not models.
            relative = os.path.relpath(path, root)
            return relative == "." or not relative.startswith(".")

        # watchfiles types stop_event as the events of the async libraries installed (trio's
        # too, with selenium in the dev tools); it only calls is_set(), as a threading.Event has.
        stop_event: Any = stop
        async for changes in awatch(
            root, watch_filter=relevant, stop_event=stop_event, debounce=50, step=20
        ):
            yield
            if any(path == root and change == Change.deleted for change, path in changes):
                return  # the watch died with its directory: the caller watches again


def _files(version_dir: Path) -> list[tuple[Path, os.stat_result]]:
    """Every file under the version directory, with its stat, recursively (following links to
    directories, each real directory once). Raises OSError when a directory cannot be listed."""
    found: list[tuple[Path, os.stat_result]] = []
    seen: set[str] = set()

    def fail(exc: OSError) -> None:
        raise exc

    for dirpath, dirnames, filenames in os.walk(version_dir, onerror=fail, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames.clear()  # a link cycle
            continue
        seen.add(real)
        for filename in filenames:
            path = Path(dirpath) / filename
            try:
                found.append((path, path.stat()))
            except FileNotFoundError:
                continue  # removed while we looked (or a dangling link)
    return found


def _escapes(files: list[tuple[Path, os.stat_result]], real_root: Path) -> tuple[Path, Path] | None:
    """The first file whose real path lies outside the repository, with that path."""
    for path, _ in sorted(files):
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(real_root):
            return path, real
    return None


def _unreadable(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"its directory cannot be read{where}: {exc.strerror or exc}"


def _failed(name: str, version: int, version_dir: Path, problem: str) -> VersionRecord:
    """A version that is there but cannot load, shown as failed with why."""
    return VersionRecord(
        name=name,
        version=version,
        path=version_dir,
        backend=None,
        artifact=None,
        problem=problem,
        fingerprint=hashlib.blake2b(problem.encode(), digest_size=12).hexdigest(),
    )


def _changed(stat: os.stat_result) -> float:
    # ctime moves on every write and rename and cannot be set back by a copy tool.
    return max(stat.st_mtime, stat.st_ctime)


def _fingerprint(files: list[tuple[Path, os.stat_result]]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for path, stat in sorted(files):
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ino}\n".encode())
    return digest.hexdigest()


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        return tomllib.loads(path.read_text()), None
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return {}, f"{path} exists but cannot be read: {reason}"
    except tomllib.TOMLDecodeError as exc:
        return {}, f"{path} is not valid TOML: {exc}"
