"""The colour-scale legend under a heatmap: the ramp, its value range and what dimming means."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from .palette import RAMP_DIM, RAMP_LEVELS, ramp_hex

LEGEND_CELLS = 24


def format_value(value: float) -> str:
    """Compact number for labels: 4 significant digits."""
    return f"{value:.4g}"


def legend_text(lo: float, hi: float, log: bool, overlay: bool) -> Text:
    """One line: low value, the ramp, high value, the scale, and the dimming key."""
    text = Text()
    text.append(f"{format_value(lo)} ")
    for i in range(LEGEND_CELLS):
        level = round(i * (RAMP_LEVELS - 1) / (LEGEND_CELLS - 1))
        text.append("█", style=ramp_hex(level))
    text.append(f" {format_value(hi)}  {'log' if log else 'linear'} · low = smooth")
    if overlay:
        dim = RAMP_DIM[RAMP_LEVELS // 2].triplet
        text.append("  ")
        text.append("██", style=dim.hex if dim is not None else "grey23")
        text.append(" pruned")
    return text


class ColorLegend(Static):
    """Legend for a `Heatmap`: call `show` whenever its bounds or overlay change."""

    DEFAULT_CSS = """
    ColorLegend { height: 1; }
    """

    def show(self, lo: float, hi: float, *, log: bool, overlay: bool) -> None:
        self.update(legend_text(lo, hi, log, overlay))
