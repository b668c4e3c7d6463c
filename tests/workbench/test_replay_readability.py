"""The decision stepper at the moments that matter: candidate sets sorted with the new member
marked, identical sets flagged, shared members said once, ranks with a legend, greedy additions
step by step, ties naming their rule, and group masks that line up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pilot_support import make_config, settle
from textual.widgets import DataTable
from torch import nn

from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.traces import (
    BeamCut,
    FinalChoice,
    LayerStart,
    StartResults,
    TmiTicket,
    TmiVote,
    TraceEvent,
)
from widgets.group_strip import group_strip_text
from widgets.stepper import StepperView
from workbench.app import WorkbenchApp
from workbench.replay import RANK_LEGEND, LayerReplay, greedy_winner
from workbench.screens.decisions import DecisionScreen


def model() -> nn.Module:
    import torch

    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Conv2d(32, 16, 3))


def replay_of(config: PruneConfig, layer: int = 1) -> tuple[LayerReplay, Any]:
    events: list[TraceEvent] = []
    plan = plan_pruning(model(), config, on_event=events.append)
    name = plan.layers[layer].name
    return LayerReplay([e for e in events if e.layer == name]), plan.layer(name)


def test_beam_cut_sets_are_sorted_marked_flagged_and_explained() -> None:
    replay, _ = replay_of(PruneConfig(groups=4))
    frames = [replay.frame(i) for i, s in enumerate(replay.steps) if isinstance(s.event, BeamCut)]
    assert frames
    seen_duplicate = False
    for position in (i for i, s in enumerate(replay.steps) if isinstance(s.event, BeamCut)):
        event = replay.steps[position].event
        frame = replay.frame(position)
        assert frame.table is not None and frame.table.columns[:3] == ("#", "", "members, +added")
        assert RANK_LEGEND in frame.notes and any("ties to the rougher, then the earlier" in n for n in frame.notes)
        shared = set.intersection(*(set(c.members) - {c.added} for c in event.candidates))
        for row, candidate in zip(frame.table.rows, event.candidates):
            shown = row[2].split()
            assert f"+{candidate.added}" in shown
            numbers = [int(m.lstrip("+")) for m in shown]
            assert numbers == sorted(numbers) and not shared & set(numbers) - {candidate.added}
            assert row[1] == ("keep" if candidate.survived else "cut")
        sets = [frozenset(c.members) for c in event.candidates]
        for i, row in enumerate(frame.table.rows):
            first = sets.index(sets[i])
            assert row[-1] == ("" if first == i else f"= #{first}")
            seen_duplicate |= first != i
    assert seen_duplicate, "this model's beam search meets the same set twice"


def test_greedy_additions_are_shown_step_by_step() -> None:
    replay, layer = replay_of(PruneConfig(groups=4, grouping="cluster:kpca", selection="greedy"))
    stages = [replay.frame(i).stage for i in range(len(replay.steps))]
    restarts = [i for i, s in enumerate(replay.steps) if isinstance(s.event, StartResults) and s.decision]
    assert len(restarts) == layer.groups and stages.count("greedy") == layer.groups * layer.kept
    first = restarts[0]
    event = replay.steps[first].event
    assert isinstance(event, StartResults)
    order = event.members[greedy_winner(event)]
    additions = range(first - layer.kept, first)
    assert [replay.frame(i).stage for i in additions] == ["greedy"] * layer.kept
    assert order[0] == event.starts[greedy_winner(event)]  # the search starts from its start kernel
    for k, position in enumerate(additions):
        frame = replay.frame(position)
        assert frame.table is not None and frame.table.rows[-1][1] == str(order[k])
        assert f"+{order[k]}" in frame.table.rows[-1][2].split()
        assert not replay.steps[position].decision
    final = next(s.event for s in replay.steps[first:] if isinstance(s.event, FinalChoice))
    assert sorted(order) == list(final.kept)


def test_ties_name_their_rule() -> None:
    start = LayerStart("c", 8, 8, (3, 3), 2, 4, "tmi", "greedy", "paper")
    ticket = TmiTicket("c", 40, ("kpca", "tsne-dbscan", "spectral"), ((1.0,),) * 3, ((0.1,),) * 3, (0.1,) * 3,
                       (0.0,) * 3, (1.5, 1.5, 0.0), (1.0, 1.0, 2.0), (2.5, 2.5, 3.0), "kpca")
    vote = TmiVote("c", ("kpca", "spectral"), (40, 41, 42, 43), ("kpca", "spectral", "spectral", "kpca"),
                   (2, 2), (1, 2), "spectral")
    replay = LayerReplay([start, ticket, vote])
    ticket_notes = replay.frame(1).notes
    assert "tie at 2.5 between kpca, tsne-dbscan: the earlier scheme, kpca, wins" in ticket_notes
    assert any("0 = smallest" in n for n in ticket_notes)
    assert "tie at 2 votes between kpca, spectral: the longest run of consecutive wins decides (spectral)" \
        in replay.frame(2).notes


def test_group_masks_line_up() -> None:
    lines = group_strip_text([[0, 10, 11], [2]], [[0, 1], [3]], in_channels=4).plain.splitlines()
    assert lines[0].index("keeps") == lines[1].index("keeps")
    assert lines[0].index("██··") == lines[1].index("···█")


async def test_a_beam_cut_fits_80x24_by_scrolling(checkpoint: Path) -> None:
    """At 80×24 only 12 of 16 candidates fitted and the last column was hidden: every candidate is
    a row of the table, every column fits the width, and what is taller than the screen scrolls."""
    app = WorkbenchApp(make_config(checkpoint))
    async with app.run_test(size=(80, 24)) as pilot:
        await settle(app, pilot)
        await pilot.press("p", "ctrl+r")
        await settle(app, pilot)
        app.action_overview()
        app.open_decisions("layer2.0.conv2")
        await pilot.pause()
        screen = app.screen
        assert isinstance(screen, DecisionScreen)
        cuts = [i for i, step in enumerate(screen.replay.steps) if isinstance(step.event, BeamCut)]
        position = max(cuts, key=lambda i: len(screen.replay.steps[i].event.candidates))  # type: ignore[union-attr]
        screen.go(position)
        await pilot.pause()
        event = screen.replay.steps[position].event
        assert isinstance(event, BeamCut) and len(event.candidates) >= 12
        view = screen.query_one(StepperView)
        table = view.query_one("#stepper-table", DataTable)
        assert table.row_count == len(event.candidates)
        assert table.virtual_size.width <= view.body.scrollable_content_region.width
        assert view.body.max_scroll_y > 0
        await pilot.press("pagedown", "pagedown", "pagedown")
        assert view.body.scroll_y == view.body.max_scroll_y  # the keys reach the last row
