"""Progress reporting and cancellation shared by every long operation, so the TUI, batch mode
and tests drive them the same way: a plain callback and a `threading.Event`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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


def part_progress(progress: ProgressCallback | None, index: int, count: int, what: str = "") -> ProgressCallback | None:
    """`progress` for part `index` of `count` equal parts of one operation: each report's done and
    total scaled into that part's share, so the whole never goes back as the parts run in order;
    messages prefixed by `what`."""
    if progress is None:
        return None

    def scaled(p: Progress) -> None:
        done, total = (index * p.total + p.done, count * p.total) if p.total else (p.done, None)
        message = f"{what}: {p.message}".rstrip(": ") if what else p.message
        progress(Progress(p.stage, done, total, message, p.metrics))

    return scaled


def check_cancel(cancel: threading.Event | None) -> None:
    """Raise `Cancelled` if the cancellation event is set."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"


@dataclass(frozen=True)
class PhaseState:
    """Where one named phase of a long operation stands: its status, its own fraction done (None
    while unknown), the seconds it has taken so far and, when skipped or failed, why."""

    name: str
    status: str = PENDING
    fraction: float | None = None
    seconds: float = 0.0
    note: str = ""


def phases_fraction(states: Sequence[PhaseState]) -> float:
    """Overall fraction of phases: finished (or skipped) ones count whole, the running one (or the
    one that failed) by how far it got, so it never goes back while the phases run in order."""
    done = sum(1.0 if s.status in (DONE, SKIPPED) else (s.fraction or 0.0) if s.status in (RUNNING, FAILED) else 0.0
               for s in states)
    return done / len(states) if states else 1.0


class Phases:
    """The named phases of one long operation (e.g. plan, reconstruct, equivalence, latency of a
    prune), each with its own progress and time. Every report carries all phases' states in
    `metrics["phases"]`, so a front end can show a line per phase and an overall fraction that
    never goes back; `stage` is the running phase, so batch mode prints a line per phase."""

    def __init__(self, names: Sequence[str], progress: ProgressCallback | None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.progress = progress
        self.clock = clock
        self.states: dict[str, PhaseState] = {name: PhaseState(name) for name in names}
        self._started = 0.0

    @contextmanager
    def run(self, name: str) -> Iterator[ProgressCallback]:
        """Run phase `name`: marks it running, yields the callback for the work inside it (its
        reports become this phase's fraction and message), marks it done, or failed when the work
        raises (the exception goes on)."""
        self._started = self.clock()
        self._set(name, RUNNING, 0.0, "")
        try:
            yield lambda p: self._inner(name, p)
        except BaseException as exc:
            self._set(name, FAILED, self.states[name].fraction, str(exc) or type(exc).__name__)
            raise
        self._set(name, DONE, 1.0, "")

    def skip(self, name: str, reason: str) -> None:
        """Mark phase `name` as not run, saying why."""
        self._started = self.clock()
        self._set(name, SKIPPED, None, reason)

    def _inner(self, name: str, progress: Progress) -> None:
        state = self.states[name]
        fraction = progress.fraction if progress.fraction is not None else state.fraction
        self.states[name] = replace(state, fraction=fraction, seconds=self.clock() - self._started)
        self._report(name, progress.done, progress.total, progress.message, progress.metrics)

    def _set(self, name: str, status: str, fraction: float | None, note: str) -> None:
        if name not in self.states:
            raise KeyError(f"unknown phase {name!r}; phases: {', '.join(self.states)}")
        seconds = self.clock() - self._started if status != PENDING else 0.0
        self.states[name] = PhaseState(name, status, fraction, seconds, note)
        finished = status in (DONE, SKIPPED)
        self._report(name, 1 if finished else 0, 1, note if status == SKIPPED else "", {})

    def _report(self, name: str, done: int, total: int | None, message: str, metrics: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress(Progress(name, done, total, message, {**metrics, "phases": tuple(self.states.values())}))
