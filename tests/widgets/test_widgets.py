"""Widgets: colour scale, heatmap rendering (half blocks, overlay, cursor, scale, cache), group
strip, filter table, stepper view and plots, each mounted in a small host app."""

from __future__ import annotations

import re

import numpy as np
from rich.text import Text
from textual.app import App, ComposeResult
from textual.widget import Widget
from textual.widgets import DataTable, Static

from widgets.bars import bar
from widgets.filter_table import FilterTable
from widgets.group_strip import GroupStrip, group_strip_text
from widgets.heatmap import HALF_BLOCK, Heatmap, HeatmapData
from widgets.legend import legend_text
from widgets.palette import (
    RAMP,
    RAMP_DIM,
    RAMP_LEVELS,
    group_color,
    quantize,
    scale_bounds,
)
from widgets.plots import ComparisonBars, CurvePlot
from widgets.stepper import Frame, StepperView, StepTable


class Host(App[None]):
    """Mounts one widget and records the messages it posts."""

    def __init__(self, widget: Widget) -> None:
        super().__init__()
        self.widget = widget
        self.cursor_events: list[tuple[int, int]] = []

    def compose(self) -> ComposeResult:
        yield self.widget

    def on_heatmap_cursor_moved(self, event: Heatmap.CursorMoved) -> None:
        self.cursor_events.append((event.row, event.col))


def test_quantize_spans_the_ramp() -> None:
    values = np.array([[0.0, 0.5, 1.0], [np.nan, 2.0, -1.0]])
    levels = quantize(values, 0.0, 1.0)
    assert levels.dtype == np.uint8
    assert levels.tolist() == [[0, 32, RAMP_LEVELS - 1], [0, RAMP_LEVELS - 1, 0]]
    log_levels = quantize(np.array([1.0, 10.0, 100.0]), 1.0, 100.0, log=True)
    assert log_levels.tolist() == [0, 32, RAMP_LEVELS - 1]


def test_scale_bounds_never_empty() -> None:
    lo, hi = scale_bounds(np.array([[3.0, 3.0]]))
    assert lo == 3.0 and hi > lo
    assert scale_bounds(np.array([0.0, 0.5, 4.0]), log=True) == (0.5, 4.0)


def test_heatmap_data_groups_rows_and_masks_kept() -> None:
    values = np.arange(12, dtype=float).reshape(4, 3)
    data = HeatmapData.build(values, filter_groups=[[1, 3], [0, 2]], kept_channels=[[0, 2], [1, 2]])
    assert data.row_order.tolist() == [1, 3, 0, 2]
    assert data.row_groups is not None and data.row_groups.tolist() == [1, 0, 1, 0]
    assert data.kept is not None
    assert data.kept.tolist() == [[False, True, True], [True, False, True], [False, True, True], [True, False, True]]
    plain = HeatmapData.build(values)
    assert plain.row_order.tolist() == [0, 1, 2, 3] and plain.kept is None


def _cells(strip: object) -> list[tuple[str, object, object]]:
    """(char, fg, bg) per cell of a strip."""
    cells = []
    for segment in strip:  # type: ignore[attr-defined]
        for char in segment.text:
            style = segment.style
            cells.append((char, style.color if style else None, style.bgcolor if style else None))
    return cells


async def test_heatmap_draws_two_rows_per_line_with_overlay() -> None:
    values = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    heatmap = Heatmap()
    app = Host(heatmap)
    async with app.run_test(size=(40, 12)) as pilot:
        heatmap.log_scale = False
        heatmap.show(HeatmapData.build(values, [[0], [1], [2]], [[0, 1], [0], [1]], grouped_order=False))
        heatmap.move_cursor(2, 1)  # keep the cursor off the cells checked below
        await pilot.pause()
        assert heatmap.scale == (4, 4)  # 2 columns fit 4x in 38 cells; 3 rows fit 4x in 12 lines
        assert heatmap.virtual_size.height == 6
        first = _cells(heatmap.render_line(0))
        assert first[0][0] == HALF_BLOCK and first[1][0] == " "  # group gutter
        assert first[0][1] == group_color(0) and first[0][2] == group_color(0)
        matrix = first[2:]
        assert all(char == HALF_BLOCK for char, _, _ in matrix[:8])
        # Row 0 kept everywhere: lowest and highest ramp colours, same row above and below.
        assert matrix[0][1] == RAMP[0] and matrix[0][2] == RAMP[0]
        assert matrix[4][1] == RAMP[RAMP_LEVELS - 1]
        # Row 1 keeps only channel 0: its second column is dimmed.
        second = _cells(heatmap.render_line(2))[2:]
        assert second[0][1] == RAMP[RAMP_LEVELS - 1]
        assert second[4][1] == RAMP_DIM[0]


async def test_heatmap_cursor_reports_data_coordinates_and_caches_lines() -> None:
    values = np.arange(8 * 6, dtype=float).reshape(8, 6)
    heatmap = Heatmap()
    app = Host(heatmap)
    async with app.run_test(size=(30, 10)) as pilot:
        heatmap.show(HeatmapData.build(values, [[4, 5, 6, 7], [0, 1, 2, 3]]))
        heatmap.focus()
        await pilot.pause()
        await pilot.press("down", "right", "right")
        await pilot.pause()
        assert heatmap.cursor == (1, 2)
        assert app.cursor_events[-1] == (5, 2)  # display row 1 is filter 5 in group order
        assert heatmap.cursor_cell == (5, 2)
        await pilot.press("end")
        assert heatmap.cursor_cell == (3, 2)
        last = heatmap.virtual_size.height - 1
        assert heatmap._chunk_strip(0, 0) is heatmap._chunk_strip(0, 0)  # cached off the cursor
        assert heatmap._chunk_strip(last, 0) is not heatmap._chunk_strip(last, 0)  # cursor line redrawn


async def test_heatmap_large_matrix_scrolls_to_cursor() -> None:
    values = np.random.default_rng(0).random((512, 512))
    heatmap = Heatmap()
    app = Host(heatmap)
    async with app.run_test(size=(80, 24)) as pilot:
        heatmap.show(HeatmapData.build(values))
        await pilot.pause()
        assert heatmap.scale == (1, 1) and heatmap.virtual_size.height == 256
        heatmap.move_cursor(511, 511)
        await pilot.pause()
        x, y = heatmap.scroll_offset
        assert y >= 256 - 24 and x >= 512 - 80
        width = heatmap.scrollable_content_region.width
        assert heatmap.render_line(23).cell_length == width
        # The first visible row, assembled from cached column chunks, shows the right cells.
        levels = quantize(values, *heatmap.bounds, log=True)
        cells = _cells(heatmap.render_line(0))
        assert [fg for _, fg, _ in cells] == [RAMP[v] for v in levels[2 * y, x : x + width]]
        assert [bg for _, _, bg in cells] == [RAMP[v] for v in levels[2 * y + 1, x : x + width]]


async def test_heatmap_log_toggle_changes_bounds() -> None:
    values = np.array([[0.001, 1.0], [10.0, 0.0]])
    heatmap = Heatmap()
    app = Host(heatmap)
    async with app.run_test(size=(20, 8)) as pilot:
        heatmap.show(HeatmapData.build(values))
        heatmap.focus()
        assert heatmap.log_scale and heatmap.bounds == (0.001, 10.0)
        await pilot.press("l")
        assert not heatmap.log_scale and heatmap.bounds == (0.0, 10.0)


async def test_heatmap_magnifies_small_matrices_within_twice_square() -> None:
    heatmap = Heatmap()
    app = Host(heatmap)
    async with app.run_test(size=(120, 20)) as pilot:
        heatmap.show(HeatmapData.build(np.ones((32, 32))))
        await pilot.pause()
        assert heatmap.scale == (2, 1)  # 3x would fit across, but only 1x fits down
        assert heatmap.virtual_size == (64, 16)


def test_legend_text_shows_bounds_and_overlay() -> None:
    text = legend_text(0.5, 2.0, log=True, overlay=True).plain
    assert text.startswith("0.5 ") and "2 " in text and "log" in text and "pruned" in text
    assert "pruned" not in legend_text(0.5, 2.0, log=False, overlay=False).plain


def test_bar_has_fixed_width() -> None:
    assert bar(0.0, 4) == "    "
    assert bar(1.0, 4) == "████"
    assert bar(0.5, 4) == "██  "
    assert bar(1 / 16, 2) == "▏ "


def test_group_strip_lists_groups_and_kept_map() -> None:
    text = group_strip_text([[0, 2], [1, 3]], [[1], None], in_channels=3, highlight=1).plain
    lines = text.splitlines()
    assert lines[0].startswith(" G0 ■ filters 0 2  keeps 1/3 ·█·")
    assert lines[1].startswith("▶G1 ■ filters 1 3  keeps ?")


async def test_group_strip_explains_missing_groups() -> None:
    strip = GroupStrip()
    app = Host(strip)
    async with app.run_test():
        strip.show(None, None, 4, empty_reason="not pruned yet")
        assert "not pruned yet" in str(strip.render())


async def test_filter_table_profile_and_sorting() -> None:
    table = FilterTable()
    app = Host(table)
    async with app.run_test(size=(60, 12)) as pilot:
        table.show(np.array([3.0, 1.0, 2.0]), [[0, 1], [2]])
        await pilot.pause()
        assert [table.get_row_at(i)[0] for i in range(3)] == [0, 1, 2]
        assert table.get_row_at(0)[3] == 2  # rank of the roughest filter
        assert isinstance(table.get_row_at(2)[4], Text) and table.get_row_at(2)[4].plain == "■ G1"
        table.focus()
        await pilot.press("s")
        assert [table.get_row_at(i)[0] for i in range(3)] == [1, 2, 0]
        table.select_filter(0)
        assert table.cursor_row == 2


def _frame(table: StepTable | None) -> Frame:
    return Frame(
        layer="conv", position=2, total=5, stage="beam cut", title="Group 0: cut", notes=("why",),
        table=table, groups=((0, 1), (2, 3)), kept=((0,), None), in_channels=2, focus_group=0,
    )


async def test_stepper_view_draws_frame() -> None:
    view = StepperView()
    app = Host(view)
    async with app.run_test(size=(80, 24)) as pilot:
        table = StepTable(("members", "score"), (("0 1", "1"), ("0 2", "3")), ("keep", "cut"))
        view.show(_frame(table))
        await pilot.pause()
        header = str(view.query_one("#stepper-header", Static).render())
        assert "beam cut" in header and "step 3/5" in header and "Group 0: cut" in header
        rows = view.query_one("#stepper-table", DataTable)
        assert rows.row_count == 2 and rows.get_row_at(1)[0].style == "red dim"
        groups = str(view.query_one("#stepper-groups", GroupStrip).render())
        assert "▶G0" in groups and "keeps ?" in groups
        view.show(_frame(None))
        await pilot.pause()
        assert not rows.display


async def test_plots_keep_their_data() -> None:
    curve = CurvePlot("loss", "epoch")
    app = Host(curve)
    async with app.run_test(size=(60, 16)) as pilot:
        curve.show({"loss": ([0.5, 1.0], [2.0, 1.5]), "empty": ([], [])})
        await pilot.pause()
        assert curve.series["loss"] == ([0.5, 1.0], [2.0, 1.5])
        assert "loss" in str(curve.render())


async def test_comparison_bars_draw_every_category() -> None:
    bars = ComparisonBars("accuracy")
    app = Host(bars)
    async with app.run_test(size=(70, 16)) as pilot:
        bars.show(["benign", "fgsm"], {"unpruned": [90.0, 40.0], "pruned": [88.0, 42.0]})
        await pilot.pause()
        rendered = str(bars.render())
        words = set(re.findall(r"[a-z]+", rendered))
        assert {"benign", "fgsm", "unpruned", "pruned"} <= words  # whole words: "unpruned" holds "pruned"

