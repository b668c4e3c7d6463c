"""Background jobs of the workbench: their record, the messages their worker threads post to
the UI (the only way a worker talks to it), and a relay that throttles progress posts and hands
over parts of a result early."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from textual.message import Message

from engine.common.progress import PhaseState, Progress, phases_fraction

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
RELAY_INTERVAL = 0.1  # seconds between progress posts; epoch ends and stage starts and ends always go through


@dataclass
class Job:
    """One background operation: what it is, how far it got, and its cancel switch."""

    id: int
    kind: str
    label: str
    cancel: threading.Event = field(default_factory=threading.Event)
    status: str = RUNNING
    progress: Progress | None = None
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def active(self) -> bool:
        return self.status == RUNNING

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def phases(self) -> tuple[PhaseState, ...]:
        """The named phases of the job with their own progress and time, when it reports them."""
        return () if self.progress is None else tuple(self.progress.metrics.get("phases", ()))

    @property
    def fraction(self) -> float | None:
        """How far the whole job is: over its phases when it has them, else its last report's."""
        if self.phases:
            return phases_fraction(self.phases)
        return None if self.progress is None else self.progress.fraction


class JobProgressed(Message):
    """A worker reports progress."""

    def __init__(self, job_id: int, progress: Progress) -> None:
        super().__init__()
        self.job_id = job_id
        self.progress = progress


class JobDone(Message):
    """A worker finished; `result` is whatever its task returned."""

    def __init__(self, job_id: int, result: Any) -> None:
        super().__init__()
        self.job_id = job_id
        self.result = result


class JobDelivered(Message):
    """A worker hands over part of its result before it is done (the open model before its data,
    one model's evaluation so far), so the UI shows it at once and keeps it if the job stops."""

    def __init__(self, job_id: int, part: Any) -> None:
        super().__init__()
        self.job_id = job_id
        self.part = part


class JobFailed(Message):
    """A worker stopped early: `cancelled`, or with `error`, the one-line reason to show;
    `detail` holds the traceback of an unexpected exception, for the log."""

    def __init__(self, job_id: int, error: str, cancelled: bool, detail: str = "") -> None:
        super().__init__()
        self.job_id = job_id
        self.error = error
        self.cancelled = cancelled
        self.detail = detail


class ProgressRelay:
    """Progress callback for a worker thread: posts `JobProgressed` at most every
    `interval` seconds, except reports carrying an epoch record or completing a stage (a phase
    starting or ending included); `deliver` posts a part of the result at once."""

    def __init__(self, job_id: int, post: Callable[[Message], Any], interval: float = RELAY_INTERVAL) -> None:
        self.job_id = job_id
        self.post = post
        self.interval = interval
        self._last = 0.0

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        important = "record" in progress.metrics or progress.done == 0 or (
            progress.total is not None and progress.done >= progress.total
        )
        if important or now - self._last >= self.interval:
            self._last = now
            self.post(JobProgressed(self.job_id, progress))

    def deliver(self, part: Any) -> None:
        self.post(JobDelivered(self.job_id, part))
