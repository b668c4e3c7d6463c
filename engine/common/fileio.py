"""Atomic file writes, so an interrupted run never leaves a half-written output behind:
temporary files are named `.NAME.*.tmp` beside their target and removed on any failure, and an
operating-system failure (disk full, no permission) is an `OutputError` naming the file."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from .errors import OutputError


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once, at import: changing the umask to read it is not thread-safe.
_UMASK = _read_umask()
FOLDER_MODE = 0o777 & ~_UMASK  # what a plain mkdir gives, for folders made by `tempfile`


def temp_prefix(name: str) -> str:
    """How the temporary files of a target called `name` begin (they end in `.tmp`)."""
    return f".{name}."


@contextmanager
def reported(target: Path) -> Iterator[None]:
    """Turn an operating-system failure while writing `target` into an `OutputError` naming it."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None


def _temp_beside(target: Path) -> tuple[int, str]:
    """A temporary file in `target`'s folder with the mode a plain `open` would give (0666 less
    the umask), so outputs are as readable as any other file the user writes."""
    with reported(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target.name), suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, tmp


def _write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> None:
    """Let `write` fill a temporary file beside `path`, fsync it, then rename it into place."""
    target = Path(path)
    fd, tmp = _temp_beside(target)
    try:
        with reported(target), os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        with reported(target):
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


def json_text(obj: Any) -> str:
    """`obj` as stable, indented JSON (sorted keys, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Atomically write `obj` as `json_text`."""
    write_text_atomic(path, json_text(obj))


def torch_save_atomic(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` straight into the temporary file (no in-memory copy), then an atomic rename."""
    import torch  # the JSON writers above serve torch-free callers (config, TUI start)

    _write_atomic(path, lambda handle: torch.save(obj, handle))


class AtomicJsonLines:
    """Stream JSON lines, already encoded, into a temporary file that replaces `path` only when
    the `with` block ends without an exception."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd, self._tmp = _temp_beside(self.path)
        self._handle = os.fdopen(fd, "w", encoding="utf-8")
        self.count = 0

    def write_lines(self, lines: list[str]) -> None:
        """Append already-encoded JSON lines (without their newlines) in one write."""
        if lines:
            with reported(self.path):
                self._handle.write("\n".join(lines) + "\n")
            self.count += len(lines)

    def __enter__(self) -> "AtomicJsonLines":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        kept = False
        try:
            with reported(self.path):
                self._handle.close()  # flushes: a full disk may fail here
                if exc_type is None:
                    os.replace(self._tmp, self.path)
                    kept = True
        finally:
            if not kept:
                Path(self._tmp).unlink(missing_ok=True)
