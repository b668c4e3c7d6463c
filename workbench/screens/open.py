"""Open another checkpoint from inside the workbench: a path field checked as you type (without
loading anything) and a file tree showing folders and checkpoint files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Static

from engine.common.errors import WorkbenchError
from engine.formats.listing import SNAPSHOT_SUFFIXES, check_file


class CheckpointTree(DirectoryTree):
    """Folders and files with a checkpoint's usual suffixes; hidden entries left out."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")
                and (p.is_dir() or p.suffix.lower() in SNAPSHOT_SUFFIXES)]


class OpenScreen(ModalScreen[str | None]):
    """Returns the path of the checkpoint to open, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = Path(current) if current else Path.cwd()

    def compose(self) -> ComposeResult:
        folder = self.current.parent if self.current.suffix else self.current
        with Vertical(id="open-box"):
            yield Static("Open checkpoint: type a path (enter opens it) or pick a file below", id="open-title")
            yield Input(str(self.current), id="open-path")
            yield Static(id="open-error")
            yield CheckpointTree(folder if folder.is_dir() else Path.cwd(), id="open-tree")

    def on_mount(self) -> None:
        self.query_one("#open-path", Input).focus()

    @on(Input.Changed, "#open-path")
    def _check(self) -> None:
        self.problem()

    def problem(self) -> str | None:
        """What is wrong with the typed path, shown under it; None when it can be a checkpoint."""
        text = self.query_one("#open-path", Input).value.strip()
        error = self.query_one("#open-error", Static)
        try:
            check_file(Path(text).expanduser())
        except WorkbenchError as exc:
            error.update(Text(str(exc), style="bold red"))
            return str(exc)
        error.update(Text("✓ a checkpoint file", style="green"))
        return None

    @on(Input.Submitted, "#open-path")
    def _submit(self) -> None:
        if self.problem() is None:
            self.dismiss(str(Path(self.query_one("#open-path", Input).value.strip()).expanduser().resolve()))

    @on(DirectoryTree.FileSelected, "#open-tree")
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        self.query_one("#open-path", Input).value = str(event.path)
        self._submit()

    def action_cancel(self) -> None:
        self.dismiss(None)
