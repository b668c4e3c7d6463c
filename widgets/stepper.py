"""The decision stepper's view: one `Frame` of a replayed pruning trace (which step, what was
decided and why, the detail table, and the filter groups and kept channels so far)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import HorizontalScroll, Vertical, VerticalScroll
from textual.widgets import DataTable, Static

from .bars import bar
from .group_strip import GroupStrip

Groups = tuple[tuple[int, ...], ...]
Kept = tuple[tuple[int, ...] | None, ...]
MARK_STYLES: dict[str, str] = {
    "current": "bold reverse",
    "keep": "green",
    "cut": "red dim",
    "win": "bold yellow",
    "pending": "dim",
    "": "",
}
POSITION_BAR = 20


@dataclass(frozen=True)
class StepTable:
    """Rows of a step's detail table; `marks[i]` tags row i (current, keep, cut, win, pending)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    marks: tuple[str, ...]


@dataclass(frozen=True)
class Frame:
    """Everything the stepper shows at one step: where it is, what was decided, the detail
    table, and the filter groups and kept channels known at that point."""

    layer: str
    position: int
    total: int
    stage: str
    title: str
    notes: tuple[str, ...]
    table: StepTable | None
    groups: Groups | None
    kept: Kept | None
    in_channels: int
    focus_group: int | None = None


def header_text(frame: Frame, playing: bool) -> Text:
    """Stage badge, position bar and step count, then the step's title."""
    text = Text()
    text.append(f" {frame.stage} ", style="bold reverse")
    fraction = (frame.position + 1) / frame.total if frame.total else 0.0
    text.append(f" {bar(fraction, POSITION_BAR)} ", style="cyan")
    text.append(f"step {frame.position + 1}/{frame.total}")
    text.append("  ▶ playing" if playing else "", style="bold green")
    text.append("\n")
    text.append(frame.title, style="bold")
    return text


class StepperView(Vertical):
    """Draws frames; the owner decides which frame (keys, play/pause, scrolling) and calls
    `show`. The header stays; the rest scrolls (`scroll_body`) when a frame is taller than the
    screen, so no row is cut off."""

    DEFAULT_CSS = """
    StepperView { height: 1fr; }
    StepperView #stepper-header { height: 2; }
    StepperView #stepper-body { height: 1fr; }
    StepperView #stepper-notes { height: auto; color: $text-muted; }
    StepperView #stepper-table { height: auto; }
    StepperView #stepper-groups-box { height: auto; border-top: solid $primary-darken-2; }
    """

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.frame: Frame | None = None
        self._columns: tuple[str, ...] = ()

    def compose(self) -> ComposeResult:
        yield Static(id="stepper-header")
        # Nothing below takes focus: the stepper's keys (arrows included) belong to its screen.
        with VerticalScroll(id="stepper-body", can_focus=False):
            yield Static(id="stepper-notes")
            table: DataTable[Text] = DataTable(id="stepper-table", cursor_type="none", zebra_stripes=True)
            table.can_focus = False
            yield table
            with HorizontalScroll(id="stepper-groups-box", can_focus=False):
                yield GroupStrip(id="stepper-groups")

    @property
    def body(self) -> VerticalScroll:
        return self.query_one("#stepper-body", VerticalScroll)

    def scroll_body(self, lines: int) -> None:
        """Scroll what is below the header by `lines`."""
        self.body.scroll_relative(y=lines, animate=False)

    def show(self, frame: Frame, playing: bool = False) -> None:
        self.frame = frame
        self.query_one("#stepper-header", Static).update(header_text(frame, playing))
        self.query_one("#stepper-notes", Static).update("\n".join(frame.notes))
        table = self.query_one("#stepper-table", DataTable)
        if frame.table is None:
            table.clear(columns=True)
            self._columns = ()
            table.display = False
        else:
            table.display = True
            if frame.table.columns != self._columns:
                table.clear(columns=True)
                table.add_columns(*frame.table.columns)
                self._columns = frame.table.columns
            else:
                table.clear()
            for row, mark in zip(frame.table.rows, frame.table.marks):
                style = MARK_STYLES.get(mark, "")
                table.add_row(*(Text(cell, style=style) for cell in row))
        self.query_one("#stepper-groups", GroupStrip).show(
            frame.groups, frame.kept, frame.in_channels, frame.focus_group,
            empty_reason="filter groups are not decided yet",
        )
