"""Atomic file writes: an interrupted or failed write never leaves a partial file."""

import json
import os
import stat
from pathlib import Path

import pytest

from engine.common.fileio import AtomicJsonLines, write_json_atomic, write_text_atomic


def test_atomic_writes_leave_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    write_text_atomic(target, "x")
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_atomic_writes_follow_the_umask(tmp_path: Path) -> None:
    """Outputs get 0666 less the umask, like any file the user writes, not mkstemp's 0600."""
    write_text_atomic(tmp_path / "a.txt", "x")
    with AtomicJsonLines(tmp_path / "b.jsonl") as lines:
        lines.write_lines(['{"k": 1}'])
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("a.txt", "b.jsonl"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask
