"""The data field of the Prune and Jobs screens: the data spec (`digits`, `cifar10:PATH`,
`imagefolder:PATH`, the rules of `--data`), checked as it is typed; enter loads it for the open
model, which refuses data the model cannot have been trained on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Input, Label, Static

from engine.common.errors import WorkbenchError
from engine.data.spec import parse_data_spec

if TYPE_CHECKING:
    from .app import WorkbenchApp


class DataField(Vertical):
    """Label, spec input and a status line saying what is loaded, or what is wrong."""

    DEFAULT_CSS = """
    DataField { height: auto; }
    DataField .data-row { height: 1; }
    DataField .data-status { height: auto; color: $text-muted; }
    """

    app: "WorkbenchApp"

    def __init__(self, label: str = "Data", *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.label = label

    def compose(self) -> ComposeResult:
        with Horizontal(classes="data-row"):
            yield Label(self.label, classes="form-label")
            yield Input(self.app.config.data.spec, placeholder="digits | cifar10:PATH | imagefolder:PATH",
                        classes="data-spec", compact=True)
        yield Static(classes="data-status")

    def on_mount(self) -> None:
        self.watch(self.app, "session_revision", self.refresh_status)

    @property
    def spec(self) -> str:
        return self.query_one(".data-spec", Input).value.strip()

    @on(Input.Changed, ".data-spec")
    def refresh_status(self, _event: object = None) -> None:
        status = self.query_one(".data-status", Static)
        ws, spec = self.app.session.workspace, self.spec
        loaded = self.app.config.data.spec if ws is not None and ws.data is not None else None
        if spec and spec == loaded:
            status.update(Text(f"✓ {spec} loaded", style="green"))
            return
        if not spec:
            status.update(Text(self.app.session.data_note or "no data set", style="yellow"))
            return
        try:
            parse_data_spec(spec)
        except WorkbenchError as exc:
            status.update(Text(f"✗ {exc}", style="bold red"))
            return
        now = f" (now: {self.app.session.data_note})" if loaded is None and self.app.session.data_note else ""
        status.update(Text(f"enter loads {spec}{now}", style="cyan"))

    @on(Input.Submitted, ".data-spec")
    def _load(self) -> None:
        self.app.set_data(self.spec)
