"""The layer inspector: kernel-smoothness heatmap (with filter groups and kept/pruned grouped
kernels once pruned), the per-filter smoothness profile and the filter groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import HorizontalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from widgets.filter_table import FilterTable
from widgets.group_strip import GroupStrip
from widgets.heatmap import Heatmap, HeatmapData
from widgets.legend import ColorLegend, format_value

from ..model_view import PRUNED

if TYPE_CHECKING:
    from ..app import WorkbenchApp


class LayerScreen(Screen[None]):
    """Inspector for one conv layer, by name."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("d", "decisions", "Decisions"),
        Binding("t", "toggle_order", "Row order", tooltip="rows by filter group or in original order"),
        Binding("h", "tab('heatmap')", "Heatmap tab", show=False),
        Binding("f", "tab('filters')", "Filter profile tab", show=False),
        Binding("g", "tab('groups')", "Filter groups tab", show=False),
    ]
    # The widget that takes the keys in each tab (arrows, l, s, scrolling).
    TAB_CONTENT = {"heatmap": "#layer-heatmap", "filters": "#filter-table", "groups": "#group-scroll"}

    app: "WorkbenchApp"

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer_name = layer
        self.grouped_order = True
        self.matrix = np.zeros((0, 0))
        self.filter_totals = np.zeros(0)
        self.filter_groups: list[list[int]] | None = None
        self.kept_channels: list[list[int]] | None = None
        self._group_of: np.ndarray | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="layer-title")
        with TabbedContent(initial="heatmap"):
            with TabPane("Heatmap", id="heatmap"):
                yield Heatmap(id="layer-heatmap")
                yield ColorLegend(id="layer-legend")
                yield Static(id="cell-info")
            with TabPane("Filters", id="filters"):
                yield FilterTable(id="filter-table")
            with TabPane("Groups", id="groups"):
                with HorizontalScroll(id="group-scroll"):
                    yield GroupStrip(id="group-strip")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.layer_name
        self.watch(self.app, "session_revision", self.refresh_view)
        self.query_one(Heatmap).focus()

    def refresh_view(self, _revision: int = 0) -> None:
        session = self.app.session
        row = session.row(self.layer_name)
        info = session.info
        matrix = None if info is None else info.smoothness.get(self.layer_name)
        title = self.query_one("#layer-title", Static)
        if row is None or info is None or matrix is None:
            title.update(Text(f"{self.layer_name}: no kernel-smoothness matrix (not a dense conv)", style="bold red"))
            return
        plan = session.plan
        lp = None
        if plan is not None and row.status == PRUNED:
            lp = plan.layer(self.layer_name)
        self.matrix = matrix
        self.filter_groups = None if lp is None else lp.filter_groups
        self.kept_channels = None if lp is None else lp.kept_channels
        self._group_of = None
        if self.filter_groups is not None:
            self._group_of = np.full(matrix.shape[0], -1, dtype=np.int64)
            for g, members in enumerate(self.filter_groups):
                self._group_of[members] = g
        detail = row.status_text
        if row.ratio is not None and row.kept is not None:
            detail += f" · keeps {row.kept}/{row.in_channels} per group ({row.ratio:.1%} pruned)"
        title.update(Text.assemble((row.name, "bold"), f"  {row.shape_text}  ", detail))
        self._draw()
        self.filter_totals = info.filter_smoothness[self.layer_name]
        self.query_one(FilterTable).show(self.filter_totals, self.filter_groups)
        self.query_one(GroupStrip).show(
            self.filter_groups, self.kept_channels, matrix.shape[1],
            empty_reason="Filter groups and kept grouped kernels appear here once the model is pruned "
            "(p: prune settings).",
        )

    def _draw(self) -> None:
        heatmap = self.query_one(Heatmap)
        heatmap.show(HeatmapData.build(self.matrix, self.filter_groups, self.kept_channels, self.grouped_order))
        self._update_legend()

    def _update_legend(self) -> None:
        heatmap = self.query_one(Heatmap)
        self.query_one(ColorLegend).show(
            *heatmap.bounds, log=heatmap.log_scale, overlay=self.kept_channels is not None
        )

    @on(Heatmap.CursorMoved)
    def _cursor_moved(self, event: Heatmap.CursorMoved) -> None:
        row, col = event.row, event.col
        if not self.matrix.size:
            return
        parts = [f"filter {row}", f"channel {col}", f"smoothness {format_value(float(self.matrix[row, col]))}"]
        group = None
        if self._group_of is not None:
            group = int(self._group_of[row])
            parts.append(f"group {group}")
        if self.kept_channels is not None and group is not None:
            parts.append("kept" if col in self.kept_channels[group] else "pruned")
        parts.append(f"filter total {format_value(float(self.filter_totals[row]))}")
        self.query_one("#cell-info", Static).update(" · ".join(parts))
        self.query_one(FilterTable).select_filter(row)
        if self.filter_groups is not None:
            self.query_one(GroupStrip).show(self.filter_groups, self.kept_channels, self.matrix.shape[1], group)

    @on(Heatmap.ScaleChanged)
    def _scale_changed(self) -> None:
        self._update_legend()

    def action_toggle_order(self) -> None:
        if self.filter_groups is None:
            self.notify("Row order only changes once the layer is pruned (rows are then sorted by group).")
            return
        self.grouped_order = not self.grouped_order
        self._draw()

    def action_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self._focus_content(tab)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id is not None:
            self._focus_content(event.pane.id)

    def _focus_content(self, tab: str) -> None:
        """Give the keys to the tab's content, not to the tab bar, so `l`, `s` and the arrows
        act at once after a tab switch."""
        self.query_one(self.TAB_CONTENT[tab]).focus()

    def action_decisions(self) -> None:
        self.app.open_decisions(self.layer_name)
