"""The help screen: what each screen is for and every key binding."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

INTRO = """\
# GKP workbench

**Overview** (`o`) shows the model and its convs; select a layer to open the **inspector**
(kernel-smoothness heatmap, filter profile, filter groups). After pruning, `d` in the inspector
opens the **decision stepper**, which replays every decision the pruning made for that layer.
**Prune** (`p`) holds the settings form and runs pruning; **Jobs** (`j`) runs AdaSAP's warmup,
fine-tuning and robustness evaluation in the background. Both have the **data** field (`digits`,
`cifar10:PATH`, `imagefolder:PATH`; data the model cannot have been trained on is refused).
`ctrl+o` opens another checkpoint. Every action is also in the command palette (`ctrl+p`).
"""


class HelpScreen(ModalScreen[None]):
    """Modal help over the current screen; any of its close keys dismisses it."""

    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def __init__(self, keys_markdown: str) -> None:
        super().__init__()
        self.keys_markdown = keys_markdown

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-box"):
            yield Markdown(INTRO + "\n" + self.keys_markdown, id="help-text")
