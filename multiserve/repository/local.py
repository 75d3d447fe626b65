"""A model repository in a local directory: scanned into catalog records, and watched."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from watchfiles import awatch

from multiserve.backends import BackendRegistry
from multiserve.catalog import VersionRecord
from multiserve.repository.classify import NO_ARTIFACT, classify
from multiserve.repository.layout import CONFIG_FILE, MARKER_FILE, is_valid_name, parse_version

logger = logging.getLogger("multiserve.repository")


class LocalRepository:
    def __init__(self, root: Path, registry: BackendRegistry) -> None:
        self.root = root
        self.registry = registry
        self._warned: set[str] = set()

    def scan(self) -> list[VersionRecord]:
        """Every version directory under the root. Anything that is not a model or a version is
        skipped with one warning (once per path, however often it is scanned); nothing in the
        folder can make the scan raise."""
        records: list[VersionRecord] = []
        warnings: dict[str, str] = {}
        for model_dir in self._dirs(self.root, warnings):
            if not is_valid_name(model_dir.name):
                warnings[str(model_dir)] = (
                    "not a valid model name ([A-Za-z0-9][A-Za-z0-9_.-]{0,127})"
                )
                continue
            model_config, model_problem = _read_config(model_dir / CONFIG_FILE)
            for version_dir in self._dirs(model_dir, warnings):
                version = parse_version(version_dir.name)
                if version is None:
                    warnings[str(version_dir)] = (
                        "not a version (a positive integer without leading zeros)"
                    )
                    continue
                record = self._scan_version(
                    model_dir.name, version, version_dir, model_config, warnings
                )
                if record is not None:
                    if model_problem and record.problem is None:
                        record = dataclasses.replace(record, problem=model_problem)
                    records.append(record)
        for path, why in warnings.items():
            if path not in self._warned:
                logger.warning("skipping %s: %s", path, why)
        self._warned = set(warnings)
        return records

    def _scan_version(
        self,
        name: str,
        version: int,
        version_dir: Path,
        model_config: dict[str, Any],
        warnings: dict[str, str],
    ) -> VersionRecord | None:
        files = _files(version_dir)
        if files is None:
            warnings[str(version_dir)] = "cannot be listed"
            return None
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

    def _dirs(self, parent: Path, warnings: dict[str, str]) -> list[Path]:
        try:
            children = sorted(parent.iterdir())
        except OSError as exc:
            warnings[str(parent)] = f"cannot be listed: {exc.strerror}"
            return []
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

    async def changes(self, stop: asyncio.Event) -> AsyncIterator[None]:
        """Yields after each batch of file-system events under the root, until ``stop``."""

        def relevant(change: object, path: str) -> bool:
            # The state directory and other dot-directories at the top are not models.
            relative = os.path.relpath(path, self.root)
            return not relative.startswith(".")

        async for _ in awatch(
            self.root, watch_filter=relevant, stop_event=stop, debounce=50, step=20
        ):
            yield


def _files(version_dir: Path) -> list[tuple[Path, os.stat_result]] | None:
    """Every file under the version directory, with its stat, recursively."""
    found: list[tuple[Path, os.stat_result]] = []
    try:
        for dirpath, _, filenames in os.walk(version_dir):
            for filename in filenames:
                path = Path(dirpath) / filename
                try:
                    found.append((path, path.stat()))
                except FileNotFoundError:
                    continue  # removed while we looked
    except OSError:
        return None
    return found


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
        return {}, f"{path.name} cannot be read: {exc}"
    except tomllib.TOMLDecodeError as exc:
        return {}, f"{path} is not valid TOML: {exc}"
