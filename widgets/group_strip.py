"""Filter groups of one layer, one line each: the group's colour, its filters and, once pruned,
a map of the input channels it keeps (█ kept, · pruned)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

from .palette import group_hex

MAX_LISTED_FILTERS = 12


def group_strip_text(
    filter_groups: Sequence[Sequence[int]],
    kept_channels: Sequence[Sequence[int] | None] | None,
    in_channels: int,
    highlight: int | None = None,
) -> Text:
    """Lines for every group; group `highlight` is marked with ▶; a group whose kept channels
    are None (not decided yet) shows no channel map. The filter lists are padded to one width, so
    the channel maps line up column by column."""
    text = Text(no_wrap=True)
    width = len(str(max(0, len(filter_groups) - 1)))
    listings = []
    for members in filter_groups:
        listed = " ".join(str(i) for i in members[:MAX_LISTED_FILTERS])
        more = f" +{len(members) - MAX_LISTED_FILTERS}" if len(members) > MAX_LISTED_FILTERS else ""
        listings.append(f"filters {listed}{more}")
    column = max(len(listing) for listing in listings) if listings else 0
    for g, members in enumerate(filter_groups):
        colour = group_hex(g)
        marker = "▶" if highlight == g else " "
        text.append(f"{marker}G{g:<{width}} ", style="bold" if marker == "▶" else "")
        text.append("■ ", style=colour)
        text.append(f"{listings[g]:<{column}}")
        if kept_channels is not None and kept_channels[g] is None:
            text.append("  keeps ?")
        elif kept_channels is not None:
            kept = set(kept_channels[g])
            text.append(f"  keeps {len(kept):>{len(str(in_channels))}}/{in_channels} ")
            for c in range(in_channels):
                text.append("█" if c in kept else "·", style=colour if c in kept else "grey42")
        text.append("\n")
    text.rstrip()
    return text


class GroupStrip(Static):
    """Shows the filter groups of a layer; `show` with no groups explains why there are none."""

    DEFAULT_CSS = """
    GroupStrip { width: auto; height: auto; }
    """

    def show(
        self,
        filter_groups: Sequence[Sequence[int]] | None,
        kept_channels: Sequence[Sequence[int] | None] | None,
        in_channels: int,
        highlight: int | None = None,
        empty_reason: str = "",
    ) -> None:
        if not filter_groups:
            self.update(Text(empty_reason or "no filter groups", style="italic"))
            return
        self.update(group_strip_text(filter_groups, kept_channels, in_channels, highlight))
