"""What an operator decided (pins, labels), kept in a small JSON file that survives restarts.

The file is replaced atomically: written to a temporary file in the same directory, flushed
and fsynced, renamed over the old one, and the directory fsynced, so a crash leaves either
the old state or the new one, never half of either.

Reading it trusts nothing: whatever the file holds either loads or is moved aside with a log
line saying why (`StateStore.load`), and each pin and label is checked as the admin API checks
it (a label named ``latest`` or ``7`` is dropped, with a warning). A file that exists but
cannot be read (permissions, I/O) stops the start instead (`StateUnreadable`): moving it aside
would lose the operator's decisions at the next write.
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

from multiserve.catalog import LATEST, Key
from multiserve.errors import SettingsError
from multiserve.repository.layout import is_valid_name, parse_version

logger = logging.getLogger("multiserve.state")

STATE_FILE = "state.json"
_FORMAT = 1
# Names a label cannot have: what the URL's version part means otherwise.
RESERVED_LABELS = frozenset({LATEST, "predict", "labels"})
_LARGEST_STATE = 16 * 1024**2  # bytes; pins and labels of many thousands of models fit


class StateUnreadable(SettingsError):
    """The state file exists but cannot be read: the server does not start without it."""


def is_valid_label(label: str) -> bool:
    """As the admin API allows: a valid name, not all digits, not a reserved word."""
    return is_valid_name(label) and label not in RESERVED_LABELS and not label.isdigit()


def _version(value: object) -> int | None:
    """A version number as the admin API takes one (an int, or its decimal string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 1 <= value < 10**18 else None
    return parse_version(value) if isinstance(value, str) else None


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
    def from_json(cls, data: Any, dropped: list[str] | None = None) -> OperatorState:
        """The state in a parsed file; ValueError if it is not a state file (its structure is
        not a state's). Entries whose values the admin API would refuse are left out, each
        told in ``dropped``."""
        dropped = [] if dropped is None else dropped
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not a multiserve state file of format {_FORMAT}")
        raw_pins, raw_labels = data.get("pins", []), data.get("labels", {})
        if not isinstance(raw_pins, list) or not isinstance(raw_labels, dict):
            raise ValueError("'pins' must be a list and 'labels' an object")
        pins = set()
        for pin in raw_pins:
            if not isinstance(pin, dict) or "name" not in pin or "version" not in pin:
                raise ValueError(f"a pin is not an object with a name and a version: {pin!r:.80}")
            name, version = pin["name"], _version(pin["version"])
            if not isinstance(name, str) or not is_valid_name(name) or version is None:
                dropped.append(f"pin {_shown(pin)} (not a model name and version number)")
                continue
            pins.add((name, version))
        labels: dict[str, dict[str, int]] = {}
        for name, table in raw_labels.items():
            if not is_valid_name(name) or not isinstance(table, dict):
                dropped.append(f"labels of {_shown(name)} (not a model name and its labels)")
                continue
            for label, value in table.items():
                version = _version(value)
                if not is_valid_label(label) or version is None:
                    dropped.append(
                        f"label {_shown(label)} of {name} -> {_shown(value)} (labels are names, "
                        "not all digits nor 'latest', for a version number)"
                    )
                    continue
                labels.setdefault(name, {})[label] = version
        return cls(frozenset(pins), MappingProxyType(labels))


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.path = directory / STATE_FILE

    def load(self) -> OperatorState:
        """The saved state; an empty one if there is none. A file that is not a state file
        (whatever it holds) is moved aside and logged, never silently overwritten; one that
        cannot be read raises `StateUnreadable`."""
        try:
            with self.path.open("rb") as stream:
                text = stream.read(_LARGEST_STATE + 1)
        except FileNotFoundError:
            return OperatorState()
        except OSError as exc:
            raise StateUnreadable(
                f"cannot read the state file {self.path} ({exc.strerror or exc}); it holds "
                "the operator's pins and labels: fix it (permissions, disk) and start again, "
                "or move it away to start without them"
            ) from None
        dropped: list[str] = []
        try:
            if len(text) > _LARGEST_STATE:
                raise ValueError(f"larger than {_LARGEST_STATE} bytes")
            state = OperatorState.from_json(json.loads(text), dropped)
        except (ValueError, RecursionError, TypeError, OverflowError) as exc:
            # ValueError includes bad UTF-8 and bad JSON; RecursionError, deeply nested JSON.
            aside = self.path.with_name(self.path.name + ".corrupt")
            reason = f"{type(exc).__name__}: {str(exc)[:200]}"
            logger.error(
                "state file %s is not a valid state file (%s): moved to %s; starting without "
                "pins and labels",
                self.path,
                reason,
                aside,
            )
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            return OperatorState()
        for what in dropped:
            logger.warning("state file %s: ignoring %s", self.path, what)
        return state

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


def _shown(value: object) -> str:
    """A value from the file, short enough for a log line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
