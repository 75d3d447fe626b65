"""examples/make_models.py: running it again leaves a repository it built untouched, so a
server watching that repository sees no change."""

from __future__ import annotations

from pathlib import Path

from examples.make_models import write_examples


def stats(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_ino, path.stat().st_mtime_ns)
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_building_the_examples_twice_changes_nothing(model_repo: Path) -> None:
    before = stats(model_repo)
    write_examples(model_repo)
    assert stats(model_repo) == before


def test_a_changed_example_is_replaced_whole(model_repo: Path) -> None:
    target = model_repo / "mlp" / "1" / "model.onnx"
    original = target.read_bytes()
    target.write_bytes(b"corrupted")
    write_examples(model_repo)
    assert target.read_bytes() == original
    assert not [p for p in model_repo.rglob(".*") if p.is_file()]  # no temporary left behind
