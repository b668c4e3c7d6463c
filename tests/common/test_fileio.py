"""Atomic file writes: an interrupted or failed write never leaves a partial file."""

import json
from pathlib import Path

import pytest

from engine.common.fileio import write_json_atomic, write_text_atomic


def test_atomic_writes_leave_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "report.json"
    write_json_atomic(target, {"b": 1, "a": [1, 2]})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()})
    assert json.loads(target.read_text()) == {"a": [1, 2], "b": 1}
    write_text_atomic(target, "x")
    assert [p.name for p in target.parent.iterdir()] == ["report.json"]
