"""Decision traces: stable JSON round trips, the JSONL file with its version header, and replays
that re-derive the snaking groups, every beam cut, the final choices and the TMI winner from the
trace alone."""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from engine.common.fileio import AtomicJsonLines
from engine.gkp.planner import plan_pruning
from engine.gkp.prune_config import PruneConfig
from engine.gkp.traces import (
    EVENT_TYPES,
    BeamCandidate,
    BeamCut,
    BeamFinal,
    Clustering,
    FinalChoice,
    LayerDone,
    LayerSkipped,
    LayerStart,
    SnakeDeal,
    StartResults,
    TmiTicket,
    TmiVote,
    TraceError,
    TraceEvent,
    TraceFile,
    event_line,
    read_jsonl,
    write_jsonl,
)
from engine.models.cifar_resnet import CifarResNet


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return CifarResNet(8)


@pytest.fixture(scope="module")
def sr_run(small_model):
    events: list[TraceEvent] = []
    plan = plan_pruning(small_model, PruneConfig(), on_event=events.append)
    return plan, events


@pytest.fixture(scope="module")
def tmi_run(small_model):
    generator = torch.Generator().manual_seed(1)
    final = small_model.state_dict()
    snapshots = {
        epoch: {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                for k, v in final.items()}
        for epoch in range(2, 6)
    }
    events: list[TraceEvent] = []
    config = PruneConfig(method="tmi-gkp", ticket_window=(2, 5))
    plan = plan_pruning(small_model, config, snapshots=snapshots, on_event=events.append)
    return plan, events, config


def by_layer(events):
    grouped = defaultdict(list)
    for event in events:
        grouped[event.layer].append(event)
    return grouped


def test_every_event_kind_round_trips_through_json(sr_run, tmi_run, tmp_path):
    events = sr_run[1] + tmi_run[1]
    kinds = {e.kind for e in events}
    assert {"layer_start", "layer_skipped", "snake_deal", "beam_cut", "beam_final", "start_results",
            "final_choice", "layer_done", "clustering", "tmi_ticket", "tmi_vote"} <= kinds
    for event in events[:400]:
        assert TraceEvent.from_dict(json.loads(json.dumps(event.to_dict()))) == event
    path = tmp_path / "trace.jsonl"
    write_jsonl(path, events)
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "gkp-workbench/trace", "version": 2}
    assert all(line == json.dumps(json.loads(line), sort_keys=True) for line in lines[:50])
    assert read_jsonl(path) == events
    for event in {e.kind: e for e in events}.values():  # the fast encoder writes what json would
        assert event_line(event) == json.dumps(event.to_dict(), sort_keys=True)
        assert list(event.to_dict()) == sorted(event.to_dict())


def test_trace_file_writes_a_layer_at_a_time_and_only_on_success(sr_run, tmp_path, monkeypatch):
    events = sr_run[1]
    writes: list[int] = []
    write_lines = AtomicJsonLines.write_lines
    monkeypatch.setattr(AtomicJsonLines, "write_lines",
                        lambda self, lines: (writes.append(len(lines)), write_lines(self, lines))[1])
    path = tmp_path / "decisions.jsonl"
    with TraceFile(path) as sink:
        for event in events:
            sink.emit(event)
        assert not path.exists()
    assert path.read_text() == "".join(event_line(e) + "\n" for e in events)
    assert read_jsonl(path) == events
    layer_ends = [i + 1 for i, e in enumerate(events) if e.kind in ("layer_done", "layer_skipped")]
    assert [w for w in writes if w] == [b - a for a, b in zip([0, *layer_ends], layer_ends)]
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError), TraceFile(failed / "decisions.jsonl") as sink:
        sink.emit(events[0])
        raise RuntimeError("cancelled")
    assert list(failed.iterdir()) == []


def test_remaining_event_kinds_round_trip():
    from engine.gkp.traces import RandomGrouping, RankedSelection
    for event in (RandomGrouping("c", ((0, 2), (1, 3))), RankedSelection("c", 1, "l2", (1.5, 0.0), (0,)),
                  Clustering("c", "tsne-dbscan", ((0,), (1,)), 0.25, 3), LayerSkipped("c", "stem")):
        assert TraceEvent.from_dict(event.to_dict()) == event
    assert set(EVENT_TYPES) >= {"random_grouping", "ranked_selection"}


def test_unreadable_traces_fail_with_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kind": "layer_skipped", "layer": "a", "reason": "x"}\n{not json\n')
    with pytest.raises(TraceError, match="line 2 is not valid JSON"):
        read_jsonl(bad)
    bad.write_text('{"kind": "teleport", "layer": "a"}\n')
    with pytest.raises(TraceError, match="unknown trace event kind 'teleport'"):
        read_jsonl(bad)
    bad.write_text('{"format": "gkp-workbench/trace", "version": 99}\n')
    with pytest.raises(TraceError, match="version 99"):
        read_jsonl(bad)
    with pytest.raises(TraceError, match="expected int"):
        TraceEvent.from_dict({"kind": "final_choice", "layer": "a", "group": "zero", "kept": [1],
                              "score": None, "start": None})
    with pytest.raises(TraceError, match="cannot read trace"):
        read_jsonl(tmp_path / "missing.jsonl")


def replay_snake(deal: SnakeDeal, n: int) -> list[list[int]]:
    assert list(deal.values) == sorted(deal.values, reverse=deal.descending)
    for rank, group in enumerate(deal.groups):
        lap, position = divmod(rank, n)
        assert group == (position if lap % 2 == 0 else n - 1 - position)
    return [sorted(f for f, g in zip(deal.filters, deal.groups) if g == group) for group in range(n)]


def replay_cut(cut: BeamCut, alpha: float, width: int) -> set[int]:
    costs = [c.cost for c in cut.candidates]
    smooths = [c.smoothness for c in cut.candidates]
    for c in cut.candidates:
        assert c.rank_cost == sum(other > c.cost for other in costs)
        assert c.rank_smooth == sum(other < c.smoothness for other in smooths)
        assert c.score == alpha * c.rank_cost + (1 - alpha) * c.rank_smooth
    order = sorted(range(len(costs)), key=lambda i: (cut.candidates[i].score, -smooths[i], i))
    assert cut.survivors == tuple(order[:width])  # best first
    return set(order[:width])


def test_replay_sr_gkp_from_the_trace_alone(sr_run):
    plan, events = sr_run
    layers = by_layer(events)
    assert [e.layer for e in events if isinstance(e, LayerSkipped)] == [s.name for s in plan.skipped]
    for layer_plan in plan.layers:
        trace = layers[layer_plan.name]
        start = next(e for e in trace if isinstance(e, LayerStart))
        done = next(e for e in trace if isinstance(e, LayerDone))
        groups = replay_snake(next(e for e in trace if isinstance(e, SnakeDeal)), start.groups)
        assert groups == layer_plan.filter_groups == [list(g) for g in done.filter_groups]
        for g in range(start.groups):
            results = next(e for e in trace if isinstance(e, StartResults) and e.group == g)
            final = next(e for e in trace if isinstance(e, FinalChoice) and e.group == g)
            winner = int(np.argmax(results.scores))  # first highest
            assert (final.start, final.score) == (winner, results.scores[winner])
            assert list(final.kept) == sorted(results.members[winner]) == layer_plan.kept_channels[g]
            beam_final = next(e for e in trace if isinstance(e, BeamFinal) and e.group == g)
            assert beam_final.start == winner
            best = beam_final.candidates[beam_final.best]
            assert best.members == results.members[winner] and best.cost == results.scores[winner]
            assert beam_final.best == int(np.argmax([c.cost for c in beam_final.candidates]))
            cuts = [e for e in trace if isinstance(e, BeamCut) and e.group == g]
            assert {c.start for c in cuts} <= {winner}
            for previous, cut in pairwise([None, *cuts]):
                survivors = replay_cut(cut, 0.9, 2)
                assert survivors == {i for i, c in enumerate(cut.candidates) if c.survived}
                grew_from = ((cut.start,),) if previous is None else \
                    tuple(previous.candidates[i].members for i in previous.survivors)
                assert cut.prefixes == grew_from  # candidates grow from the previous cut's survivors


def test_replay_tmi_gkp_vote_and_greedy_from_the_trace_alone(tmi_run):
    plan, events, config = tmi_run
    layers = by_layer(events)
    for layer_plan in plan.layers:
        trace = layers[layer_plan.name]
        tickets = [e for e in trace if isinstance(e, TmiTicket)]
        assert [t.epoch for t in tickets] == config.ticket_epochs
        winners = []
        for ticket in tickets:
            means, variances = [], []
            for scores, gaps in zip(ticket.group_scores, ticket.gaps):
                ordered = sorted(scores, reverse=True)
                assert list(gaps) == pytest.approx([a - b for a, b in zip(ordered, ordered[1:])])
                means.append(np.mean(gaps))
                variances.append(np.var(gaps))
            score = rankdata(means) + config.tmi_alpha * rankdata(variances)
            assert list(score) == pytest.approx(list(ticket.score))
            winners.append(ticket.schemes[int(np.argmin(ticket.score))])
            assert winners[-1] == ticket.winner
        tally = {s: winners.count(s) for s in config.tmi_schemes}
        runs = {s: max((len(r) for r in "".join("x" if w == s else " " for w in winners).split()), default=0)
                for s in config.tmi_schemes}
        expected = max(config.tmi_schemes, key=lambda s: (tally[s], runs[s], -config.tmi_schemes.index(s)))
        vote = next(e for e in trace if isinstance(e, TmiVote))
        assert vote.winner == expected and layer_plan.grouping == f"tmi:{expected}"
        clustering = next(e for e in trace if isinstance(e, Clustering) and e.scheme == expected)
        assert [list(g) for g in clustering.filter_groups] == layer_plan.filter_groups
        for g, kept in enumerate(layer_plan.kept_channels):
            results = next(e for e in trace if isinstance(e, StartResults) and e.group == g)
            assert results.selection == "greedy"
            assert sorted(results.members[int(np.argmax(results.scores))]) == kept


def test_full_level_traces_every_start(small_model):
    runs = {}
    for level in ("decisions", "full"):
        events: list[TraceEvent] = []
        config = PruneConfig(trace_level=level, exclude=["layer2.0.conv2", "layer3.0.conv1", "layer3.0.conv2"])
        runs[level] = plan_pruning(small_model, config, on_event=events.append), events
    (plan, decisions), (full_plan, full) = runs["decisions"], runs["full"]
    assert [l.to_dict() for l in full_plan.layers] == [l.to_dict() for l in plan.layers]
    layer = plan.layers[-1]
    starts = {e.start for e in full if isinstance(e, BeamCut) and e.layer == layer.name and e.group == 0}
    assert starts == set(range(layer.in_channels))
    assert [e for e in full if not isinstance(e, (BeamCut, BeamFinal))] == \
        [e for e in decisions if not isinstance(e, (BeamCut, BeamFinal))]
    assert sum(map(len, map(json.dumps, (e.to_dict() for e in full)))) > \
        5 * sum(map(len, map(json.dumps, (e.to_dict() for e in decisions))))


def test_beam_cuts_are_stored_by_column_and_read_whole():
    """Candidate i is its prefix plus its steps, judged by its set's row; equal sets share a row
    and survivors keep their order."""
    cut = BeamCut("conv", 0, 3, 4, 0.5, ((3, 1),), (0, 0, 0), ((5, 6, 5), (6, 5, 7)), (0, 0, 1),
                  (2.5, 1.0), (0.25, 0.5), (0, 1), (1, 0), (0.1, 0.9), (2, 0))
    assert cut.candidates == (
        BeamCandidate((3, 1, 5, 6), 6, 2.5, 0.25, 0, 1, 0.1, True),
        BeamCandidate((3, 1, 6, 5), 5, 2.5, 0.25, 0, 1, 0.1, False),
        BeamCandidate((3, 1, 5, 7), 7, 1.0, 0.5, 1, 0, 0.9, True),
    )
    line = json.loads(event_line(cut))
    assert line["steps"] == [[5, 6, 5], [6, 5, 7]] and "candidates" not in line
    assert TraceEvent.from_dict(line) == cut


@pytest.mark.parametrize(("field", "value", "message"), [
    ("state", [0, 0, 2], "refers to a prefix, set or candidate"),
    ("prefix", [0, 1, 0], "refers to a prefix, set or candidate"),
    ("survivors", [3], "refers to a prefix, set or candidate"),
    ("steps", [[5, 6]], "different lengths"),
    ("steps", [], "different lengths"),
    ("score", [0.1], "different lengths"),
])
def test_beam_cut_columns_that_do_not_fit_are_refused(field, value, message):
    cut = BeamCut("conv", 0, 3, 3, 0.5, ((3,),), (0, 0, 0), ((5, 6, 7), (6, 5, 5)), (0, 0, 1),
                  (2.5, 1.0), (0.25, 0.5), (0, 1), (1, 0), (0.1, 0.9), (0,))
    with pytest.raises(TraceError, match=message):
        TraceEvent.from_dict({**cut.to_dict(), field: value})


def test_version_1_traces_still_read(sr_run, tmp_path):
    """A trace written before beam cuts were stored by column (version 1: whole candidates)
    reads as the same decisions: every cut's candidates are equal."""
    from decision_digests import version_1_line

    events = sr_run[1]
    path = tmp_path / "old.jsonl"
    header = json.dumps({"format": "gkp-workbench/trace", "version": 1})
    path.write_text("\n".join([header, *map(version_1_line, events)]) + "\n")
    assert '"candidates": [{"added"' in path.read_text()
    old = read_jsonl(path)
    assert [e for e in old if not isinstance(e, BeamCut)] == [e for e in events if not isinstance(e, BeamCut)]
    cuts = [(a, b) for a, b in zip(old, events) if isinstance(b, BeamCut)]
    assert len(cuts) > 10
    for read, planned in cuts:
        assert read.candidates == planned.candidates
        assert read.survivors == planned.survivors
        assert (read.state, read.cost, read.smoothness, read.score) == \
            (planned.state, planned.cost, planned.smoothness, planned.score)  # rows by first appearance
    assert sum(len(b.cost) for _, b in cuts) < sum(len(b.prefix) for _, b in cuts)  # equal sets share a row
    bad = json.loads(version_1_line(cuts[0][1]))
    bad["candidates"][0]["added"] = -1
    with pytest.raises(TraceError, match="last member"):
        TraceEvent.from_dict(bad)


def test_cut_costs_and_smoothness_are_eq3_of_the_candidate_sets(small_model, sr_run):
    """Every recorded cut value is recomputed from the layer's weights: Eq. 3 of the candidate's
    set at the cut's beta, and its members' summed grouped-kernel smoothness, in real units."""
    from engine.gkp.selection import grouped_kernels, kernel_distances
    from engine.gkp.smoothness import kernel_smoothness

    plan, events = sr_run
    modules = dict(small_model.named_modules())
    checked = 0
    for layer_plan in plan.layers:
        weight = modules[layer_plan.name].weight.detach()
        heat = kernel_smoothness(weight, PruneConfig().smoothness_power).numpy()
        for cut in (e for e in events if isinstance(e, BeamCut) and e.layer == layer_plan.name):
            filters = layer_plan.filter_groups[cut.group]
            distances = kernel_distances(grouped_kernels(weight, filters))
            smooth = heat[filters].sum(axis=0)
            for candidate in cut.candidates:
                inside = list(candidate.members)
                outside = [p for p in range(len(distances)) if p not in inside]
                inner = distances[np.ix_(inside, inside)].sum() / 2
                outer = distances[np.ix_(outside, inside)].min(axis=1).sum()
                assert candidate.cost == pytest.approx(inner - cut.beta * outer, rel=1e-9, abs=1e-12)
                assert candidate.smoothness == pytest.approx(smooth[inside].sum(), rel=1e-9)
                checked += 1
    assert checked > 100
