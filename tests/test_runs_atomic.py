"""runs.atomic_directory: a directory appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentopd.runs import atomic_directory


def test_a_built_directory_replaces_the_old_one_whole(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"  # untouched until the block ends
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert (target / "new.txt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left


def test_a_failure_leaves_the_old_directory_and_no_temporary(tmp_path: Path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(target) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
