"""The decision stepper: walk through one layer's pruning trace step by step, jump between
decision points, or play it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.timer import Timer
from textual.widgets import Footer, Header

from engine.gkp.traces import TraceEvent
from widgets.stepper import StepperView

from ..replay import LayerReplay

if TYPE_CHECKING:
    from ..app import WorkbenchApp

PLAY_INTERVAL = 0.15  # seconds per step while playing


class DecisionScreen(Screen[None]):
    """Stepper over the trace events of one layer."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("right,l", "step(1)", "Step"),
        Binding("left,h", "step(-1)", "Step back"),
        Binding("n", "decision(1)", "Next decision"),
        Binding("N", "decision(-1)", "Prev decision"),
        Binding("space", "play", "Play/pause"),
        Binding("home", "go(0)", "First", show=False),
        Binding("end", "go(-1)", "Last", show=False),
        Binding("down", "scroll(1)", "Scroll down", show=False),
        Binding("up", "scroll(-1)", "Scroll up", show=False),
        Binding("pagedown", "scroll(10)", "Page down", show=False),
        Binding("pageup", "scroll(-10)", "Page up", show=False),
    ]

    app: "WorkbenchApp"

    def __init__(self, layer: str, events: list[TraceEvent]) -> None:
        super().__init__()
        self.layer_name = layer
        self.replay = LayerReplay(events)
        self.position = 0
        self._timer: Timer | None = None

    @property
    def playing(self) -> bool:
        return self._timer is not None

    def compose(self) -> ComposeResult:
        yield Header()
        yield StepperView(id="stepper")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"decisions · {self.layer_name}"
        self._show()

    def on_unmount(self) -> None:
        self._stop()

    def _show(self) -> None:
        self.query_one(StepperView).show(self.replay.frame(self.position), self.playing)

    def go(self, position: int) -> None:
        """Show step `position` (negative counts from the end), clamped to the replay."""
        last = len(self.replay.steps) - 1
        self.position = min(max(position if position >= 0 else last + 1 + position, 0), last)
        if self.position == last:
            self._stop()
        self._show()

    def action_step(self, delta: int) -> None:
        self.go(self.position + delta)

    def action_go(self, position: int) -> None:
        self.go(position)

    def action_scroll(self, lines: int) -> None:
        """Scroll a step taller than the screen (tables with many candidates at 80×24)."""
        self.query_one(StepperView).scroll_body(lines)

    def action_decision(self, direction: int) -> None:
        replay = self.replay
        self.go(replay.next_decision(self.position) if direction > 0 else replay.previous_decision(self.position))

    def action_play(self) -> None:
        if self.playing:
            self._stop()
        else:
            if self.position == len(self.replay.steps) - 1:
                self.position = 0
            self._timer = self.set_interval(PLAY_INTERVAL, lambda: self.action_step(1))
        self._show()

    def _stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
