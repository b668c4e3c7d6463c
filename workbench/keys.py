"""Every key binding of the workbench in one place, read from the screens and widgets
themselves, so the help screen and docs/TUI.md never drift from what the keys do."""

from __future__ import annotations

from textual.binding import Binding

from widgets.filter_table import FilterTable
from widgets.heatmap import Heatmap

from .screens.decisions import DecisionScreen
from .screens.jobs import JobsScreen
from .screens.layer import LayerScreen
from .screens.overview import OverviewScreen
from .screens.prune import PruneScreen

APP_BINDINGS: list[Binding] = [
    Binding("o", "overview", "Overview"),
    Binding("p", "switch_mode('prune')", "Prune"),
    Binding("j", "switch_mode('jobs')", "Jobs"),
    Binding("question_mark,f1", "help", "Help", key_display="?"),
    Binding("ctrl+o", "open_checkpoint", "Open checkpoint", show=False),
    Binding("ctrl+g", "cancel_jobs", "Cancel jobs", show=False),
]
BUILTIN: list[tuple[str, str]] = [
    ("ctrl+p", "Command palette: every action by name"),
    ("ctrl+q", "Quit (asks first while jobs run, then cancels them)"),
]
_KEY_NAMES = {"question_mark": "?", "slash": "/", "space": "space", "escape": "esc"}


def _bindings(owner: type) -> list[Binding]:
    return [b for b in getattr(owner, "BINDINGS", []) if isinstance(b, Binding)]


def key_sections() -> list[tuple[str, list[tuple[str, str]]]]:
    """(section title, [(keys, what they do)]) for the app and each screen and widget."""
    owners: list[tuple[str, list[Binding]]] = [
        ("Everywhere", APP_BINDINGS),
        ("Overview (layer table)", _bindings(OverviewScreen)),
        ("Layer inspector", _bindings(LayerScreen)),
        ("Heatmap", _bindings(Heatmap)),
        ("Filter profile", _bindings(FilterTable)),
        ("Decision stepper", _bindings(DecisionScreen)),
        ("Prune", _bindings(PruneScreen)),
        ("Jobs", _bindings(JobsScreen)),
    ]
    sections = []
    for title, bindings in owners:
        rows = [(key_text(b.key), _action_text(b)) for b in bindings]
        if title == "Everywhere":
            rows.extend(BUILTIN)
        sections.append((title, rows))
    return sections


def _action_text(binding: Binding) -> str:
    text = binding.description or binding.action
    return f"{text} ({binding.tooltip})" if binding.tooltip else text


def key_text(keys: str) -> str:
    """`question_mark,f1` → `? / f1`."""
    return " / ".join(_KEY_NAMES.get(k, k) for k in keys.split(","))


def bindings_markdown() -> str:
    """The key bindings as Markdown tables, one per section."""
    parts = ["## Key bindings", ""]
    for title, rows in key_sections():
        parts += [f"### {title}", "", "| Keys | Action |", "| --- | --- |"]
        parts += [f"| `{keys}` | {action} |" for keys, action in rows]
        parts.append("")
    return "\n".join(parts)
