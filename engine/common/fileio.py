"""Atomic file writes, so an interrupted run never leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def _write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Let `write` fill a temporary file beside `path`, fsync it, then rename it into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write `data`."""
    _write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write UTF-8 text."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as stable, indented JSON (sorted keys, trailing newline)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` straight into the temporary file (no in-memory copy), then an atomic rename."""
    import torch  # the JSON writers above serve torch-free callers (config, TUI start)

    _write_atomic(path, lambda handle: torch.save(obj, handle))


class AtomicJsonLines:
    """Stream JSON lines, already encoded, into a temporary file that replaces `path` only when
    the `with` block ends without an exception."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._handle = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0

    def write_lines(self, lines: list[str]) -> None:
        """Append already-encoded JSON lines (without their newlines) in one write."""
        if lines:
            self._handle.write("\n".join(lines) + "\n")
            self.count += len(lines)

    def __enter__(self) -> "AtomicJsonLines":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._handle.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            Path(self._tmp).unlink(missing_ok=True)
