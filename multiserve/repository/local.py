"""A model repository in a local directory, scanned into catalog records."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from pathlib import Path
from typing import Any

from multiserve.backends import BackendRegistry
from multiserve.catalog import VersionRecord
from multiserve.repository.layout import CONFIG_FILE, is_valid_name, merge_config, parse_version

logger = logging.getLogger("multiserve.repository")


class LocalRepository:
    def __init__(self, root: Path, registry: BackendRegistry) -> None:
        self.root = root
        self.registry = registry

    def scan(self) -> list[VersionRecord]:
        """Every version directory under the root. Anything that is not a model or a version is
        skipped with one warning; nothing in the folder can make the scan raise."""
        records: list[VersionRecord] = []
        for model_dir in _sorted_dirs(self.root):
            if not is_valid_name(model_dir.name):
                _skip(model_dir, "not a valid model name ([A-Za-z0-9][A-Za-z0-9_.-]{0,127})")
                continue
            model_config, model_problem = _read_config(model_dir / CONFIG_FILE)
            for version_dir in _sorted_dirs(model_dir):
                version = parse_version(version_dir.name)
                if version is None:
                    _skip(version_dir, "not a version (a positive integer without leading zeros)")
                    continue
                record = self._scan_version(model_dir.name, version, version_dir, model_config)
                if record is not None:
                    if model_problem and record.problem is None:
                        record = dataclasses.replace(record, problem=model_problem)
                    records.append(record)
        return records

    def _scan_version(
        self, name: str, version: int, version_dir: Path, model_config: dict[str, Any]
    ) -> VersionRecord | None:
        version_config, problem = _read_config(version_dir / CONFIG_FILE)
        options = merge_config(model_config, version_config)
        declared = options.pop("backend", None)
        try:
            filenames = [p.name for p in version_dir.iterdir() if p.is_file()]
        except OSError as exc:
            _skip(version_dir, f"cannot be listed: {exc.strerror}")
            return None

        backend = str(declared) if declared is not None else None
        artifact: str | None = None
        if backend is None:
            try:
                found = self.registry.detect(version_dir, filenames)
            except ValueError as exc:
                found, problem = None, problem or str(exc)
            if found is not None:
                backend, artifact = found
            elif problem is None:
                _skip(version_dir, "holds no model artifact (model.onnx, model.pt, model.pt2)")
                return None
        return VersionRecord(
            name=name,
            version=version,
            path=version_dir,
            backend=backend,
            artifact=artifact or None,
            options=options,
            problem=problem,
        )


def _sorted_dirs(parent: Path) -> list[Path]:
    try:
        children = sorted(parent.iterdir())
    except OSError as exc:
        logger.warning("cannot list %s: %s", parent, exc.strerror)
        return []
    dirs = []
    for child in children:
        if child.name.startswith(".") or child.name == CONFIG_FILE:
            continue
        if child.is_dir():
            dirs.append(child)
        else:
            _skip(child, "not a directory")
    return dirs


def _read_config(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        return tomllib.loads(path.read_text()), None
    except FileNotFoundError:
        return {}, None
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"{path.name} cannot be read: {exc}"
    except tomllib.TOMLDecodeError as exc:
        return {}, f"{path} is not valid TOML: {exc}"


def _skip(path: Path, why: str) -> None:
    logger.warning("skipping %s: %s", path, why)
