"""The state file under hostile or damaged content (issue 12): whatever it holds loads or is
moved aside with a log line; a file that cannot be read stops the start; pins and labels are
checked as the admin API checks them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from multiserve.errors import SettingsError
from multiserve.state import OperatorState, StateStore, StateUnreadable

ASIDE = [
    pytest.param(b"[" * 100_000, id="100000 nested ["),
    pytest.param(b'{"format": 1, "pins": [' * 5_000, id="nested pins"),
    pytest.param(b'{"format": 1, "pins": [{"name": "m", "version": ' + b"9" * 5000 + b"}]}",
                 id="5000 digits"),
    pytest.param(b"\xff\xfe\x00garbage", id="not utf-8"),
    pytest.param(b"", id="empty"),
    pytest.param(b"null", id="null"),
    pytest.param(b'{"format": 1, "pins": {"m": 1}}', id="pins an object"),
    pytest.param(b'{"format": 1, "labels": [["m", "x", 1]]}', id="labels a list"),
    pytest.param(b'{"format": 1, "pins": [7]}', id="pin a number"),
    pytest.param(b'{"format": 1.0000000000000002}', id="format nearly 1"),
]  # fmt: skip


@pytest.mark.parametrize("content", ASIDE)
def test_content_that_is_no_state_is_moved_aside_with_a_log_line(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, "multiserve.state"):
        assert StateStore(tmp_path).load() == OperatorState()
    assert (tmp_path / "state.json.corrupt").read_bytes() == content
    assert not (tmp_path / "state.json").exists()
    assert "moved to" in caplog.text
    assert "state.json.corrupt" in caplog.text


def write_state(root: Path, pins: object, labels: object) -> StateStore:
    (root / "state.json").write_text(json.dumps({"format": 1, "pins": pins, "labels": labels}))
    return StateStore(root)


def test_version_1e400_is_dropped_and_the_rest_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state.json").write_text(
        '{"format": 1, "pins": [{"name": "m", "version": 1e400}, {"name": "m", "version": 2}],'
        ' "labels": {"m": {"stable": 1e400, "canary": 2}}}'
    )
    with caplog.at_level(logging.WARNING, "multiserve.state"):
        state = StateStore(tmp_path).load()
    assert state.pins == frozenset({("m", 2)})
    assert dict(state.labels) == {"m": {"canary": 2}}
    assert caplog.text.count("ignoring") == 2


@pytest.mark.parametrize(
    "label", ["latest", "7", "007", "predict", "labels", "", "-x", "a/b", "é", "x" * 200]
)
def test_labels_the_admin_api_refuses_are_dropped(
    tmp_path: Path, label: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = write_state(tmp_path, [], {"m": {label: 1, "stable": 1}})
    with caplog.at_level(logging.WARNING, "multiserve.state"):
        state = store.load()
    assert dict(state.labels) == {"m": {"stable": 1}}
    assert "ignoring label" in caplog.text


@pytest.mark.parametrize(
    "pin",
    [
        {"name": "m", "version": True},
        {"name": "m", "version": 0},
        {"name": "m", "version": -3},
        {"name": "m", "version": 1.5},
        {"name": "m", "version": "1e3"},
        {"name": "m", "version": 10**30},
        {"name": "../etc", "version": 1},
        {"name": 5, "version": 1},
    ],
)
def test_pins_the_admin_api_refuses_are_dropped(tmp_path: Path, pin: dict[str, object]) -> None:
    state = write_state(tmp_path, [pin, {"name": "m", "version": "3"}], {}).load()
    assert state.pins == frozenset({("m", 3)})


def test_a_model_name_that_is_no_name_drops_its_labels(tmp_path: Path) -> None:
    state = write_state(tmp_path, [], {"../x": {"stable": 1}, "m": {"stable": 1}}).load()
    assert dict(state.labels) == {"m": {"stable": 1}}


def test_a_file_that_cannot_be_read_stops_the_start_and_is_kept(tmp_path: Path) -> None:
    """Not corruption (here: a directory where the file should be, which root cannot read
    either): moving it aside would lose the operator's pins and labels at the next write."""
    (tmp_path / "state.json").mkdir()
    (tmp_path / "state.json" / "keep").write_text("x")
    with pytest.raises(StateUnreadable, match="cannot read the state file") as caught:
        StateStore(tmp_path).load()
    assert isinstance(caught.value, SettingsError)  # the CLI prints it and exits with 2
    assert (tmp_path / "state.json" / "keep").exists()
    assert not (tmp_path / "state.json.corrupt").exists()
