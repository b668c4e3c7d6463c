"""A scrollable matrix heatmap drawn with the line API: one text row holds two matrix rows
("▀" with the upper row as foreground and the lower as background), strips are cached, so a
512×512 layer scrolls without redrawing the whole matrix."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Size
from textual.message import Message
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from .palette import RAMP, RAMP_DIM, RAMP_LEVELS, group_color, quantize, scale_bounds

HALF_BLOCK = "▀"
_CURSOR = 2 * RAMP_LEVELS
_EMPTY = _CURSOR + 1
_STRIDE = _EMPTY + 1
_COLORS = (*RAMP, *RAMP_DIM, Style.parse("white").color)
GUTTER = 2  # group colour cell plus a space, when rows carry groups
MAX_SCALE = 4  # small matrices are magnified up to this many cells per value
CHUNK = 64  # matrix columns per cached strip piece


@functools.cache
def style_table() -> tuple[Style, ...]:
    """Every (foreground, background) colour pair as a style, indexed `fg * _STRIDE + bg`;
    background `_EMPTY` is the widget's own (the lower half of an odd last row)."""
    return tuple(
        Style.from_color(_COLORS[fg], None if bg == _EMPTY else _COLORS[bg])
        for fg in range(len(_COLORS)) for bg in range(_STRIDE)
    )


@dataclass(frozen=True)
class HeatmapData:
    """A matrix to draw (rows = filters, columns = input channels) with an optional pruning
    overlay: each row's filter group and which cells are kept."""

    values: np.ndarray
    row_order: np.ndarray
    row_groups: np.ndarray | None = None
    kept: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        values: np.ndarray,
        filter_groups: Sequence[Sequence[int]] | None = None,
        kept_channels: Sequence[Sequence[int]] | None = None,
        grouped_order: bool = True,
    ) -> "HeatmapData":
        """Rows in group order (or original order) with each row's group and, when the kept
        channels of every group are known, the kept mask."""
        values = np.asarray(values, dtype=np.float64)
        rows, cols = values.shape
        if not filter_groups:
            return cls(values, np.arange(rows))
        groups = np.full(rows, -1, dtype=np.int64)
        for g, members in enumerate(filter_groups):
            groups[list(members)] = g
        order = (
            np.array([i for members in filter_groups for i in members], dtype=np.int64)
            if grouped_order else np.arange(rows)
        )
        kept = None
        if kept_channels is not None:
            kept = np.zeros((rows, cols), dtype=bool)
            for members, channels in zip(filter_groups, kept_channels):
                kept[np.ix_(list(members), list(channels))] = True
        return cls(values, order, groups, kept)


class Heatmap(ScrollView, can_focus=True):
    """Kernel-smoothness heatmap with a movable cursor cell; rows are filters, columns input
    channels; pruned cells are dimmed and each row's group colour sits in a left gutter. Small
    matrices are magnified by integer factors so they fill the view."""

    DEFAULT_CSS = """
    Heatmap { height: 1fr; }
    """

    BINDINGS = [
        Binding("up", "move(-1, 0)", "Cursor to the filter above", show=False),
        Binding("down", "move(1, 0)", "Cursor to the filter below", show=False),
        Binding("left", "move(0, -1)", "Cursor to the previous input channel", show=False),
        Binding("right", "move(0, 1)", "Cursor to the next input channel", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home", "jump(0)", "First filter", show=False),
        Binding("end", "jump(1)", "Last filter", show=False),
        Binding("l", "toggle_log", "Log/linear colours"),
    ]

    # Kernel smoothness sums squared weights, so it spans orders of magnitude: log by default.
    log_scale: reactive[bool] = reactive(True)

    class CursorMoved(Message):
        """The cursor is on matrix cell (`row`, `col`) in data coordinates."""

        def __init__(self, heatmap: "Heatmap", row: int, col: int) -> None:
            super().__init__()
            self.heatmap = heatmap
            self.row = row
            self.col = col

        @property
        def control(self) -> "Heatmap":
            return self.heatmap

    class ScaleChanged(Message):
        """The colour scale changed (log/linear), so a legend must redraw."""

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.data: HeatmapData | None = None
        self.bounds: tuple[float, float] = (0.0, 1.0)
        self.scale = (1, 1)
        self._levels = np.zeros((0, 0), dtype=np.int64)
        self._keys = np.zeros((0, 0), dtype=np.int64)
        self._row_groups: np.ndarray | None = None
        self._groups: np.ndarray | None = None
        self._cursor = (0, 0)
        self._lines: LRUCache[tuple[int, int], Strip] = LRUCache(4096)

    @property
    def cursor(self) -> tuple[int, int]:
        """Cursor as (display row, column)."""
        return self._cursor

    @property
    def cursor_cell(self) -> tuple[int, int] | None:
        """Cursor as (data row, column), or None with no data."""
        if self.data is None:
            return None
        return int(self.data.row_order[self._cursor[0]]), self._cursor[1]

    @property
    def group_gutter(self) -> int:
        return GUTTER if self._row_groups is not None else 0

    def show(self, data: HeatmapData) -> None:
        """Draw `data`; keeps the cursor where it was when the shape is unchanged."""
        same_shape = self.data is not None and self.data.values.shape == data.values.shape
        self.data = data
        self._prepare()
        if not same_shape:
            self._cursor = (0, 0)
            self.scroll_to(0, 0, animate=False)
        self._announce()

    def watch_log_scale(self) -> None:
        if self.data is not None:
            self._prepare()
        self.post_message(self.ScaleChanged())

    def on_resize(self) -> None:
        if self.data is not None and self._fit_scale() != self.scale:
            self._apply_scale()

    def _prepare(self) -> None:
        """Colour codes in display order (ramp level, dimmed when pruned), then magnified."""
        assert self.data is not None
        data = self.data
        self.bounds = scale_bounds(data.values, self.log_scale)
        levels = quantize(data.values, *self.bounds, log=self.log_scale).astype(np.int64)
        if data.kept is not None:
            levels = np.where(data.kept, levels, levels + RAMP_LEVELS)
        self._levels = levels[data.row_order]
        self._row_groups = None if data.row_groups is None else data.row_groups[data.row_order]
        self._apply_scale()

    def _fit_scale(self) -> tuple[int, int]:
        """The largest magnification (columns, half-rows per cell; each up to MAX_SCALE and at
        most twice the other, so cells stay roughly square) at which the matrix fits the view."""
        rows, cols = self._levels.shape
        region = self.scrollable_content_region
        width, height = region.width - self.group_gutter, region.height
        if rows == 0 or cols == 0 or width <= 0 or height <= 0:
            return (1, 1)
        sx = max(1, min(MAX_SCALE, width // cols))
        sy = max(1, min(MAX_SCALE, (2 * height) // rows))
        return min(sx, 2 * sy), min(sy, 2 * sx)

    def _apply_scale(self) -> None:
        self.scale = self._fit_scale()
        sx, sy = self.scale
        codes = np.repeat(np.repeat(self._levels, sy, axis=0), sx, axis=1)
        if codes.shape[0] % 2:
            codes = np.vstack([codes, np.full((1, codes.shape[1]), _EMPTY, dtype=codes.dtype)])
        # One style key per text cell: upper half-row as foreground, lower as background.
        self._keys = codes[0::2] * _STRIDE + codes[1::2]
        self._groups = None if self._row_groups is None else np.repeat(self._row_groups, sy)
        self._lines.clear()
        lines, width = self._keys.shape
        self.virtual_size = Size(self.group_gutter + width, lines)
        self.refresh()

    def _cursor_lines(self) -> range:
        sy = self.scale[1]
        first = self._cursor[0] * sy
        return range(first // 2, (first + sy - 1) // 2 + 1)

    def _chunk_strip(self, line: int, chunk: int) -> Strip:
        """Columns `chunk*CHUNK ..` of text row `line`; cached unless the row holds the cursor,
        so scrolling only draws chunks it has not seen. Equal neighbours share one segment."""
        cursor_line = line in self._cursor_lines()
        key = (line, chunk)
        if not cursor_line and key in self._lines:
            return self._lines[key]
        first_column = chunk * CHUNK
        keys = self._keys[line, first_column : first_column + CHUNK].tolist()
        if cursor_line:
            sx, sy = self.scale
            rows = range(self._cursor[0] * sy, (self._cursor[0] + 1) * sy)
            first = self._cursor[1] * sx - first_column
            for column in range(max(0, first), min(len(keys), first + sx)):
                top, bottom = divmod(keys[column], _STRIDE)
                keys[column] = (_CURSOR if 2 * line in rows else top) * _STRIDE + (
                    _CURSOR if 2 * line + 1 in rows else bottom
                )
        styles = style_table()
        segments: list[Segment] = []
        run_key, run = keys[0], 0
        for cell in keys:
            if cell == run_key:
                run += 1
                continue
            segments.append(Segment(HALF_BLOCK * run, styles[run_key]))
            run_key, run = cell, 1
        segments.append(Segment(HALF_BLOCK * run, styles[run_key]))
        strip = Strip(segments, len(keys))
        if not cursor_line:
            self._lines[key] = strip
        return strip

    def _matrix_strip(self, line: int, start: int, width: int) -> Strip:
        """Matrix cells `start .. start+width` of text row `line`, from cached chunks."""
        end = min(start + width, self._keys.shape[1])
        if end <= start:
            return Strip([], 0)
        chunks = range(start // CHUNK, (end - 1) // CHUNK + 1)
        joined = Strip.join([self._chunk_strip(line, chunk) for chunk in chunks])
        offset = chunks.start * CHUNK
        return joined.crop(start - offset, end - offset)

    def _gutter_strip(self, line: int) -> Strip:
        assert self._groups is not None
        half_rows = self._groups.size
        top = int(self._groups[2 * line])
        bottom = int(self._groups[2 * line + 1]) if 2 * line + 1 < half_rows else -1
        style = Style(
            color=group_color(top) if top >= 0 else None,
            bgcolor=group_color(bottom) if bottom >= 0 else None,
        )
        return Strip([Segment(HALF_BLOCK, style), Segment(" ")], GUTTER)

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        line = scroll_y + y
        base = self.rich_style
        if self.data is None or line >= self.virtual_size.height:
            return Strip.blank(width, base)
        matrix = self._matrix_strip(line, scroll_x, max(0, width - self.group_gutter))
        strip = Strip.join([self._gutter_strip(line), matrix]) if self._groups is not None else matrix
        return strip.extend_cell_length(width, base)

    def move_cursor(self, row: int, col: int) -> None:
        """Put the cursor on display cell (`row`, `col`) (clamped) and scroll it into view."""
        if self.data is None:
            return
        rows, cols = self._levels.shape
        old_lines = self._cursor_lines()
        self._cursor = (min(max(row, 0), rows - 1), min(max(col, 0), cols - 1))
        lines = self._cursor_lines()
        sx = self.scale[0]
        left, right = self._cursor[1] * sx, (self._cursor[1] + 1) * sx - 1
        height = max(1, self.scrollable_content_region.height)
        width = max(1, self.scrollable_content_region.width - self.group_gutter)
        scroll_x, scroll_y = self.scroll_offset
        new_y = lines.start if lines.start < scroll_y else (
            lines.stop - height if lines.stop > scroll_y + height else scroll_y
        )
        new_x = left if left < scroll_x else (right - width + 1 if right >= scroll_x + width else scroll_x)
        if (new_x, new_y) != (scroll_x, scroll_y):
            self.scroll_to(new_x, new_y, animate=False)
        for line in (*old_lines, *lines):
            self.refresh_line(line)
        self._announce()

    def _announce(self) -> None:
        cell = self.cursor_cell
        if cell is not None:
            self.post_message(self.CursorMoved(self, *cell))

    def action_move(self, rows: int, cols: int) -> None:
        self.move_cursor(self._cursor[0] + rows, self._cursor[1] + cols)

    def action_page(self, direction: int) -> None:
        step = max(1, 2 * self.scrollable_content_region.height // self.scale[1] - 1)
        self.move_cursor(self._cursor[0] + direction * step, self._cursor[1])

    def action_jump(self, end: int) -> None:
        self.move_cursor(self._levels.shape[0] - 1 if end else 0, self._cursor[1])

    def action_toggle_log(self) -> None:
        self.log_scale = not self.log_scale

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or self.data is None or offset.x < self.group_gutter:
            return
        scroll_x, scroll_y = self.scroll_offset
        # A click cannot tell the two half rows of a text row apart; it picks the upper one.
        sx, sy = self.scale
        self.move_cursor(2 * (scroll_y + offset.y) // sy, (scroll_x + offset.x - self.group_gutter) // sx)
