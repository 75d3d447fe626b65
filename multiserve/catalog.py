"""Every known (name, version): an immutable snapshot that is replaced, never mutated."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from multiserve.errors import ModelNotFound, VersionNotFound
from multiserve.repository.layout import parse_version

Key = tuple[str, int]
LATEST = "latest"


Ident = tuple[str, int, str]  # (name, version, fingerprint): one set of a version's files


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One version directory as discovered.

    ``problem`` is set when discovery already knows it cannot load (a bad config.toml, two
    artifacts); such a version is reported as failed. ``fingerprint`` changes whenever any of
    its files does. ``settled`` is false while its files are still being written; ``staged``
    is true while a newer version of a hot model is being loaded and warmed before ``latest``
    moves to it.
    """

    name: str
    version: int
    path: Path
    backend: str | None
    artifact: str | None
    options: Mapping[str, Any] = field(default_factory=dict)
    problem: str | None = None
    fingerprint: str = ""
    changed_at: float = 0.0
    marker: bool = False
    size_bytes: int = 0
    version_policy: str | None = None
    warmup: bool | None = None
    max_batch_size: int | None = None
    inference_threads: int | None = None
    settled: bool = True
    staged: bool = False

    @property
    def key(self) -> Key:
        return (self.name, self.version)

    @property
    def ident(self) -> Ident:
        return (self.name, self.version, self.fingerprint)


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    versions: Mapping[int, VersionRecord]

    def descending(self) -> list[VersionRecord]:
        return [self.versions[v] for v in sorted(self.versions, reverse=True)]


@dataclass(frozen=True, slots=True)
class Catalog:
    models: Mapping[str, ModelRecord] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_records(cls, records: list[VersionRecord]) -> Catalog:
        by_name: dict[str, dict[int, VersionRecord]] = {}
        for record in records:
            by_name.setdefault(record.name, {})[record.version] = record
        return cls(
            MappingProxyType(
                {
                    name: ModelRecord(name, MappingProxyType(dict(sorted(versions.items()))))
                    for name, versions in sorted(by_name.items())
                }
            )
        )

    def find(self, key: Key) -> VersionRecord | None:
        model = self.models.get(key[0])
        return None if model is None else model.versions.get(key[1])

    def records(self) -> list[VersionRecord]:
        return [record for model in self.models.values() for record in model.versions.values()]

    def with_record(self, record: VersionRecord) -> Catalog:
        """A new catalog with ``record`` in place of the one with its key."""
        records = [r for r in self.records() if r.key != record.key]
        return Catalog.from_records([*records, record])

    def model(self, name: str) -> ModelRecord:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(f"model {name!r} not found")
        return model

    def candidates(self, name: str, selector: str) -> list[VersionRecord]:
        """The versions a URL's version part may mean, best first: one for a number, every
        version newest first for ``latest``."""
        model = self.model(name)
        if selector == LATEST:
            if not model.versions:
                raise VersionNotFound(f"model {name!r} has no versions")
            return model.descending()
        number = parse_version(selector)
        record = model.versions.get(number) if number is not None else None
        if record is None:
            raise VersionNotFound(
                f"model {name!r} has no version {selector!r}; versions: "
                + ", ".join(str(v) for v in model.versions)
                + " (or 'latest')"
            )
        return [record]
