"""The first screen: what the model is (architecture, cost, data, device, normalisation) and a
sortable, filterable table of its convs; selecting a layer opens the inspector."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static

from ..model_view import OPENING, PRUNED, SKIPPED, WILL_PRUNE, LayerRow, human_count

if TYPE_CHECKING:
    from ..app import WorkbenchApp

STATUS_STYLES = {WILL_PRUNE: "cyan", PRUNED: "green", SKIPPED: "dim", OPENING: "italic dim"}
# Sort keys: label and how to order rows by it (None sorts last).
SORTS: tuple[tuple[str, Callable[[LayerRow], Any] | None], ...] = (
    ("order", None),
    ("name", lambda r: r.name),
    ("params", lambda r: r.params),
    ("MACs", lambda r: r.macs),
    ("MACs after", lambda r: r.macs_after),
    ("smoothness", lambda r: r.mean_smoothness),
    ("ratio", lambda r: r.ratio),
    ("status", lambda r: r.status_text),
)
COLUMNS = ("layer", "shape", "params", "MACs", "smooth", "ratio", "status")
PRUNED_COLUMNS = ("layer", "shape", "params", "MACs", "MACs after", "smooth", "ratio", "status")


def sort_rows(rows: list[LayerRow], sort_index: int, reverse: bool) -> list[LayerRow]:
    """Rows in the chosen order; rows without a value go last either way."""
    _, key = SORTS[sort_index]
    if key is None:
        return list(reversed(rows)) if reverse else list(rows)
    present = [r for r in rows if key(r) is not None]
    missing = [r for r in rows if key(r) is None]
    return sorted(present, key=key, reverse=reverse) + missing


def filter_rows(rows: list[LayerRow], text: str) -> list[LayerRow]:
    """Rows whose name or status contains `text` (case-insensitive)."""
    needle = text.strip().lower()
    if not needle:
        return rows
    return [r for r in rows if needle in r.name.lower() or needle in r.status_text.lower()]


def _opt(value: float | None, fmt: Callable[[float], str]) -> str:
    return "—" if value is None else fmt(value)


def row_cells(row: LayerRow, with_after: bool) -> tuple[Text | str, ...]:
    """Cells of one row; the MACs-after column only exists once the model is pruned."""
    after = (_opt(row.macs_after, human_count),) if with_after else ()
    return (
        row.name,
        row.shape_text,
        human_count(row.params),
        _opt(row.macs, human_count),
        *after,
        _opt(row.mean_smoothness, lambda v: f"{v:.4g}"),
        _opt(row.ratio, lambda v: f"{v:.1%}"),
        Text(row.status_text, style=STATUS_STYLES.get(row.status, "")),
    )


class OverviewScreen(Screen[None]):
    """Model summary and layer table."""

    BINDINGS = [
        Binding("slash", "focus_filter", "Filter"),
        Binding("s", "cycle_sort", "Sort"),
        Binding("r", "reverse_sort", "Reverse"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    app: "WorkbenchApp"

    def __init__(self) -> None:
        super().__init__()
        self.sort_index = 0
        self.reverse = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="summary")
        with Horizontal(id="filter-bar"):
            yield Input(placeholder="filter layers by name or status  (/)", id="layer-filter", compact=True)
            yield Static(id="sort-info")
        yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.watch(self.app, "session_revision", self.refresh_view)
        self.query_one("#layers", DataTable).focus()

    def refresh_view(self, _revision: int = 0) -> None:
        session = self.app.session
        summary = self.query_one("#summary", Static)
        table = self.query_one("#layers", DataTable)
        if session.open_error is not None:
            summary.update(Text(session.open_error, style="bold red"))
            self._loading(False)
            table.clear()
            return
        if session.workspace is None or session.info is None:
            listed = session.listing is not None
            message = f"Opening {self.app.checkpoint_label}: " + (
                f"{len(session.rows())} convs listed from the file; loading the model, its smoothness and MACs …"
                if listed else "loading …"
            )
            summary.update(Text(message, style="italic"))
            self._loading(not listed)
            if listed:
                self._fill_table()
            return
        self._loading(False)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="bold cyan", no_wrap=True)
        grid.add_column()
        for label, value in self.app.summary_lines():
            grid.add_row(label, value)
        summary.update(grid)
        self._fill_table()

    def _loading(self, loading: bool) -> None:
        """Show the table's loading indicator, or take it away and give the table the keys."""
        table = self.query_one("#layers", DataTable)
        if table.loading and not loading:
            table.loading = False
            table.focus()
        else:
            table.loading = loading

    def _fill_table(self) -> None:
        table = self.query_one("#layers", DataTable)
        selected = self.selected_layer()
        rows = filter_rows(self.app.session.rows(), self.query_one("#layer-filter", Input).value)
        rows = sort_rows(rows, self.sort_index, self.reverse)
        with_after = self.app.session.outcome is not None
        columns = PRUNED_COLUMNS if with_after else COLUMNS
        if tuple(str(c.label) for c in table.columns.values()) != columns:
            table.clear(columns=True)
            table.add_columns(*columns)
        table.clear()
        for row in rows:
            table.add_row(*row_cells(row, with_after), key=row.name)
        if selected is not None and selected in table.rows:
            table.move_cursor(row=table.get_row_index(selected))
        label, _ = SORTS[self.sort_index]
        arrow = "▼" if self.reverse else "▲"
        self.query_one("#sort-info", Static).update(f"{len(rows)} convs · sort: {label} {arrow}")

    def selected_layer(self) -> str | None:
        table = self.query_one("#layers", DataTable)
        if table.row_count == 0:
            return None
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return key.value

    @on(Input.Changed, "#layer-filter")
    def _filter_changed(self) -> None:
        if self.app.session.rows():
            self._fill_table()

    @on(Input.Submitted, "#layer-filter")
    def _filter_submitted(self) -> None:
        self.query_one("#layers", DataTable).focus()

    @on(DataTable.RowSelected, "#layers")
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.app.open_layer(event.row_key.value)

    @on(DataTable.HeaderSelected, "#layers")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        label = {"layer": "name", "smooth": "smoothness"}.get(str(event.label), str(event.label))
        names = [name for name, _ in SORTS]
        if label in names:
            index = names.index(label)
            self.reverse = not self.reverse if index == self.sort_index else False
            self.sort_index = index
            self._fill_table()

    def action_focus_filter(self) -> None:
        self.query_one("#layer-filter", Input).focus()

    def action_clear_filter(self) -> None:
        self.query_one("#layer-filter", Input).value = ""
        self.query_one("#layers", DataTable).focus()

    def action_cycle_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(SORTS)
        self._fill_table()

    def action_reverse_sort(self) -> None:
        self.reverse = not self.reverse
        self._fill_table()
