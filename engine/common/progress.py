"""Progress reporting and cancellation shared by every long operation, so the TUI, batch mode
and tests drive them the same way: a plain callback and a `threading.Event`."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """One progress report: `done` of `total` units of `stage`, plus free-form metrics."""

    stage: str
    done: int
    total: int | None = None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float | None:
        return None if not self.total else min(1.0, self.done / self.total)


ProgressCallback = Callable[[Progress], None]


def report(callback: ProgressCallback | None, progress: Progress) -> None:
    """Send `progress` to `callback` when there is one."""
    if callback is not None:
        callback(progress)


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise `Cancelled` if the cancellation event is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")
