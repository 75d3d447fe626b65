"""What an operator decided (pins, labels), kept in a small JSON file that survives restarts.

The file is replaced atomically: written to a temporary file in the same directory, flushed
and fsynced, renamed over the old one, and the directory fsynced, so a crash leaves either
the old state or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from multiserve.catalog import Key

logger = logging.getLogger("multiserve.state")

STATE_FILE = "state.json"
_FORMAT = 1


@dataclass(frozen=True, slots=True)
class OperatorState:
    pins: frozenset[Key] = frozenset()
    labels: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))

    def with_pin(self, key: Key, pinned: bool) -> OperatorState:
        pins = self.pins | {key} if pinned else self.pins - {key}
        return OperatorState(pins, self.labels)

    def with_label(self, name: str, label: str, version: int | None) -> OperatorState:
        labels = {model: dict(table) for model, table in self.labels.items()}
        table = labels.setdefault(name, {})
        if version is None:
            table.pop(label, None)
        else:
            table[label] = version
        if not table:
            del labels[name]
        return OperatorState(self.pins, MappingProxyType(labels))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "pins": [{"name": name, "version": version} for name, version in sorted(self.pins)],
            "labels": {
                name: dict(sorted(table.items())) for name, table in sorted(self.labels.items())
            },
        }

    @classmethod
    def from_json(cls, data: Any) -> OperatorState:
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a multiserve state file of format {_FORMAT}")
        pins = frozenset((str(pin["name"]), int(pin["version"])) for pin in data.get("pins", []))
        labels = {
            str(name): {str(label): int(version) for label, version in table.items()}
            for name, table in data.get("labels", {}).items()
        }
        return cls(pins, MappingProxyType(labels))


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def load(self) -> OperatorState:
        """The saved state; an empty one if there is none. A corrupt file is moved aside (and
        logged), never silently overwritten."""
        try:
            return OperatorState.from_json(json.loads(self.path.read_text()))
        except FileNotFoundError:
            return OperatorState()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            logger.error("state file %s is unreadable (%s); moved to %s", self.path, exc, aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return OperatorState()

    def save(self, state: OperatorState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(descriptor, "w") as stream:
                json.dump(state.to_json(), stream, indent=2)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
