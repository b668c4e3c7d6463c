"""Asks for the input normalisation when a job needs it and the checkpoint does not record it."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Static

from engine.common.errors import ConfigError
from engine.models.normalization import Normalization, parse_normalization

PROMPT = (
    "{name} does not record the input normalisation it was trained with, and {job} needs it.\n"
    "Enter cifar10, imagenet, none, MEAN,STD or m1,m2,m3/s1,s2,s3 — as the model was trained."
)


class NormalizationScreen(ModalScreen[Normalization | None]):
    """Returns the parsed normalisation, or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, checkpoint_name: str, job: str, channels: int) -> None:
        super().__init__()
        self.checkpoint_name = checkpoint_name
        self.job = job
        self.channels = channels

    def compose(self) -> ComposeResult:
        with Vertical(id="norm-box"):
            yield Static(PROMPT.format(name=self.checkpoint_name, job=self.job), id="norm-prompt")
            yield Input(placeholder="e.g. cifar10", id="norm-input")
            yield Static(id="norm-error")
            with Horizontal(classes="button-row"):
                yield Button("Use it", id="norm-ok", variant="primary", compact=True)
                yield Button("Cancel", id="norm-cancel", compact=True)

    def on_mount(self) -> None:
        self.query_one("#norm-input", Input).focus()

    @on(Input.Submitted, "#norm-input")
    @on(Button.Pressed, "#norm-ok")
    def _submit(self) -> None:
        try:
            norm = parse_normalization(self.query_one("#norm-input", Input).value).for_channels(self.channels)
        except ConfigError as exc:
            self.query_one("#norm-error", Static).update(Text(str(exc), style="bold red"))
            return
        self.dismiss(norm)

    @on(Button.Pressed, "#norm-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
