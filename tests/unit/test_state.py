from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from multiserve.state import OperatorState, StateStore


def test_state_round_trips_through_the_file(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    state = OperatorState().with_pin(("mlp", 2), True).with_label("mlp", "stable", 2)
    state = state.with_label("mlp", "canary", 3).with_pin(("adder", 1), True)
    store.save(state)
    assert store.load() == state
    saved = json.loads((tmp_path / "state" / "state.json").read_text())
    assert saved["pins"] == [{"name": "adder", "version": 1}, {"name": "mlp", "version": 2}]
    assert saved["labels"] == {"mlp": {"canary": 3, "stable": 2}}


def test_removing_pins_and_labels(tmp_path: Path) -> None:
    state = OperatorState().with_pin(("m", 1), True).with_label("m", "stable", 1)
    state = state.with_pin(("m", 1), False).with_label("m", "stable", None)
    assert state == OperatorState(frozenset(), {})
    assert state.to_json()["labels"] == {}


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load() == OperatorState()


@pytest.mark.parametrize(
    "content", ["{not json", '{"format": 99}', '{"format": 1, "pins": [{"x": 1}]}', "[]"]
)
def test_corrupt_file_is_moved_aside_not_overwritten(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    assert StateStore(tmp_path).load() == OperatorState()
    assert (tmp_path / "state.json.corrupt").read_text() == content
    assert not (tmp_path / "state.json").exists()


def test_save_replaces_atomically_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save(OperatorState().with_pin(("a", 1), True))
    inode = os.stat(tmp_path / "state.json").st_ino
    store.save(OperatorState().with_pin(("b", 2), True))
    assert os.stat(tmp_path / "state.json").st_ino != inode  # renamed over, not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failed_save_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = StateStore(tmp_path)
    store.save(OperatorState().with_pin(("a", 1), True))

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        store.save(OperatorState().with_pin(("b", 2), True))
    monkeypatch.undo()
    assert store.load().pins == {("a", 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
