"""Per-filter smoothness profile of one layer: each filter's smoothness as a bar, its rank and
the filter group it landed in; sortable by index or smoothness."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from .bars import bar
from .legend import format_value
from .palette import group_hex

BAR_WIDTH = 16


class FilterTable(DataTable[Text | str | int]):
    """Filters of a layer with their smoothness profile; row keys are filter indices."""

    BINDINGS = [Binding("s", "toggle_sort", "Sort filters")]

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=True)
        self.by_smoothness = False
        self._smoothness = np.zeros(0)
        self._groups: np.ndarray | None = None

    def on_mount(self) -> None:
        self.add_column("filter", key="filter")
        self.add_column("smoothness", key="smoothness")
        self.add_column("profile", key="profile", width=BAR_WIDTH)
        self.add_column("rank", key="rank")
        self.add_column("group", key="group")

    def show(self, smoothness: np.ndarray, filter_groups: Sequence[Sequence[int]] | None) -> None:
        """Fill the table from per-filter smoothness and, when known, the filter groups."""
        self._smoothness = np.asarray(smoothness, dtype=np.float64)
        self._groups = None
        if filter_groups:
            self._groups = np.full(self._smoothness.size, -1, dtype=np.int64)
            for g, members in enumerate(filter_groups):
                self._groups[list(members)] = g
        self._fill()

    def _fill(self) -> None:
        self.clear()
        values = self._smoothness
        if values.size == 0:
            return
        ranks = np.empty(values.size, dtype=np.int64)
        ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
        top = float(values.max()) or 1.0
        order = np.argsort(values, kind="stable") if self.by_smoothness else np.arange(values.size)
        for i in order:
            group: Text | str = "—"
            if self._groups is not None and self._groups[i] >= 0:
                g = int(self._groups[i])
                group = Text.assemble(("■ ", group_hex(g)), f"G{g}")
            self.add_row(
                int(i), format_value(float(values[i])), Text(bar(float(values[i]) / top, BAR_WIDTH), style="cyan"),
                int(ranks[i]), group, key=str(int(i)),
            )

    def select_filter(self, index: int) -> None:
        """Move the cursor to filter `index`."""
        if str(index) in self.rows:
            self.move_cursor(row=self.get_row_index(str(index)))

    def action_toggle_sort(self) -> None:
        self.by_smoothness = not self.by_smoothness
        self._fill()
