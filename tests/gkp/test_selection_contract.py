"""Stage 2 selection's contract beyond the choices themselves: the batched `*_many` entry points
and their SPEC defaults, memory-bounded chunking, the error a user reads, cancellation, the exact
trace events, and the baselines against naive references."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from test_selection import naive_beam_starts, naive_greedy, random_case

from engine.common.errors import Cancelled
from engine.gkp import selection
from engine.gkp.selection import (
    Choice,
    Group,
    GroupContext,
    greedy_many,
    greedy_select,
    grouped_kernels,
    kernel_distances,
    l2_select,
    least_smooth_select,
    pair_beta,
    random_select,
    smooth_beam_many,
    smooth_beam_select,
)
from engine.gkp.traces import (
    BeamCut,
    BeamFinal,
    FinalChoice,
    RankedSelection,
    StartResults,
    Tracer,
)

LAYER, GROUP = "layer2.1.conv1", 3


def traced(level: str = "decisions") -> tuple[list, GroupContext]:
    events: list = []
    return events, GroupContext(Tracer(events.append, level), LAYER, GROUP)


def scaled_groups(seed: int, count: int, channels: int) -> list[Group]:
    """`count` random groups, group i's distances scaled by i + 1 so later groups score higher."""
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(count):
        d, smooth = random_case(rng, channels, high=1000)
        groups.append(Group(d * (i + 1), smooth))
    return groups


def test_grouped_kernels_layout_from_numpy_and_float32_torch():
    """Row c of a group's grouped kernels is kernel c of each filter in group order, flattened;
    numpy weights are used as given and float32 tensors are measured in float64."""
    weight = np.arange(3 * 5 * 2 * 2, dtype=np.float64).reshape(3, 5, 2, 2)
    expected = np.stack([np.concatenate([weight[2, c].ravel(), weight[0, c].ravel()]) for c in range(5)])
    from_numpy = grouped_kernels(weight, [2, 0])
    assert isinstance(from_numpy, np.ndarray) and np.array_equal(from_numpy, expected)
    single = torch.randn(4, 6, 3, 3, generator=torch.Generator().manual_seed(0))
    kernels = grouped_kernels(single, [1, 3])
    assert isinstance(kernels, np.ndarray) and kernels.dtype == np.float64
    assert np.array_equal(kernel_distances(kernels), kernel_distances(grouped_kernels(single.double(), [1, 3])))


def test_impossible_kept_count_message():
    """Keeping none or more kernels than a group has is refused with the counts in words."""
    d = np.zeros((4, 4))
    for select, message in ((lambda: greedy_select(d, 5), "cannot keep 5 of 4 grouped kernels"),
                            (lambda: smooth_beam_select(d, np.zeros(4), 0), "cannot keep 0 of 4 grouped kernels"),
                            (lambda: random_select(3, 4, np.random.default_rng(0)), "cannot keep 4 of 3 grouped kernels")):
        with pytest.raises(ValueError) as error:
            select()
        assert str(error.value) == message


def test_many_defaults_are_the_spec_values():
    """`smooth_beam_many` and `greedy_many` called bare decide as with SPEC §4's defaults written
    out (beam width 2, check every 3, alpha 0.9, paper beta; gamma ratio 0.2, beta auto, floor)."""
    rng = np.random.default_rng(4)
    groups = [Group(*random_case(rng, 16, high=30)) for _ in range(12)]
    rng = np.random.default_rng(9)
    channels = int(rng.integers(11, 17))
    cut_at_ten = Group(random_case(rng, channels, high=30)[0], rng.random(channels))  # a cut at S decides
    beam = dict(beam_width=2, check_every=3, alpha=0.9, freeze_beta=False, cut_at_final=False)
    for batch, kept in ((groups, 5), (groups, 10), ([cut_at_ten], 10)):
        assert smooth_beam_many(batch, kept) == smooth_beam_many(batch, kept, **beam)
    greedy = dict(gamma_ratio=0.2, beta="auto", floor_gamma=True)
    for kept in (2, 9):
        assert greedy_many(groups, kept) == greedy_many(groups, kept, **greedy)


@pytest.mark.parametrize("budget", [1 << 20, 200, 36])
def test_many_groups_decide_as_one_at_a_time(monkeypatch, budget):
    """Batching groups of one shape, in one chunk or split over several, gives each group the
    choice it gets alone."""
    monkeypatch.setattr(selection, "_CHUNK_ELEMENTS", budget)
    groups = scaled_groups(1, 3, 6)
    assert greedy_many(groups, 3) == [greedy_select(g.distances, 3) for g in groups]
    assert greedy_many(groups[:2], 4) == [greedy_select(g.distances, 4) for g in groups[:2]]
    beam = [smooth_beam_select(g.distances, g.smoothness, 4, beam_width=2, check_every=1) for g in groups]
    assert smooth_beam_many(groups, 4, beam_width=2, check_every=1) == beam


def chunk_sizes(lanes: int, per_lane: int, budget: int) -> list[int]:
    """Lanes per search call under the documented budget: as many as fit, at least one."""
    size = max(1, budget // per_lane)
    return [min(size, lanes - lo) for lo in range(0, lanes, size)]


def test_chunks_fill_the_memory_budget_and_no_more(monkeypatch):
    """Each search call takes as many (group, start) lanes as `lanes x candidates x C_in` allows
    within the budget, one lane when a single lane exceeds it, whatever the trace level."""
    calls: list[tuple[int, bool]] = []
    real_grow = selection.grow

    def grow(problems, beam, owner, starts, **kwargs):
        calls.append((len(starts), kwargs.get("record", False)))
        return real_grow(problems, beam, owner, starts, **kwargs)

    monkeypatch.setattr(selection, "grow", grow)
    groups = scaled_groups(2, 3, 6)
    for budget, run, per_lane, lanes in (
        (24, lambda: greedy_many(groups, 3), 6, 18),
        (400, lambda: smooth_beam_many(groups[:2], 5), 16 * 6, 12),
        (50, lambda: smooth_beam_many(groups[:1], 5), 16 * 6, 6),
        (400, lambda: smooth_beam_select(groups[0].distances, groups[0].smoothness, 5,
                                         context=traced("full")[1]), 16 * 6, 6),
    ):
        monkeypatch.setattr(selection, "_CHUNK_ELEMENTS", budget)
        calls.clear()
        run()
        assert [n for n, _ in calls] == chunk_sizes(lanes, per_lane, budget), budget


def test_cancel_stops_full_traces_and_the_traced_replay(monkeypatch):
    """A set cancel event stops a full-trace search, and one set once the search itself is done
    still stops the replay that records the winner's beam events."""
    d, smooth = random_case(np.random.default_rng(8), 8)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        smooth_beam_select(d, smooth, 5, context=traced("full")[1], cancel=cancel)
    late = threading.Event()
    real_grow = selection.grow

    def grow(*args, **kwargs):
        grown = real_grow(*args, **kwargs)
        late.set()
        return grown

    monkeypatch.setattr(selection, "grow", grow)
    events, context = traced()
    with pytest.raises(Cancelled):
        smooth_beam_select(d, smooth, 5, context=context, cancel=late)
    assert events == []


def test_greedy_events_field_by_field():
    """A traced greedy search emits every start's set and score, then the final choice, under its
    layer and group."""
    d, _ = random_case(np.random.default_rng(10), 9, high=40)
    events, context = traced()
    choice = greedy_select(d, 4, context=context)
    expected, best = naive_greedy(d, 4)
    beta = 6 / 5  # C(4,2) / ((9-4) * gamma 1)
    assert best != 0 and choice == Choice(sorted(expected[best][1]), expected[best][0], best)
    assert events == [
        StartResults(LAYER, GROUP, "greedy", beta, 1, tuple(range(9)), tuple(tuple(m) for _, m in expected),
                     tuple(s for s, _ in expected)),
        FinalChoice(LAYER, GROUP, tuple(choice.kept), choice.score, best),
    ]


def beam_start_results(d, smooth, kept) -> StartResults:
    """The StartResults a beam search must emit, from the naive search: each start's best
    candidate (earliest on ties) and its cost."""
    per_start = naive_beam_starts(d, smooth, kept)
    best = [max(cands, key=lambda cand: cand[0]) for cands in per_start]
    return StartResults(LAYER, GROUP, "smooth-beam", pair_beta(kept, len(d)), 1, tuple(range(len(d))),
                        tuple(tuple(m) for _, m in best), tuple(c for c, _ in best))


def check_beam_events(events, d, smooth, kept, start):
    """BeamCut and BeamFinal events of one start: layer, group, sizes, betas, and each
    candidate's cost and smoothness in real units."""
    channels = len(d)
    cuts = [e for e in events if isinstance(e, BeamCut) and e.start == start]
    final = next(e for e in events if isinstance(e, BeamFinal) and e.start == start)
    assert [(c.layer, c.group, c.size, c.beta) for c in cuts] == [
        (LAYER, GROUP, size, pair_beta(size, channels)) for size in range(4, kept, 3)]
    for cut in cuts:
        for cand in cut.candidates:
            naive = selection_cost(d, cand.members, pair_beta(cut.size, channels))
            assert cand.cost == pytest.approx(naive, rel=1e-12)
            assert cand.smoothness == pytest.approx(sum(smooth[i] for i in cand.members), rel=1e-12)
    assert (final.layer, final.group, final.beta) == (LAYER, GROUP, pair_beta(kept, channels))
    costs = [selection_cost(d, c.members, final.beta) for c in final.candidates]
    assert [c.cost for c in final.candidates] == pytest.approx(costs, rel=1e-12)
    assert [c.smoothness for c in final.candidates] == pytest.approx(
        [sum(smooth[i] for i in c.members) for c in final.candidates], rel=1e-12)
    assert final.best == costs.index(max(costs))


def selection_cost(d, members, beta):
    """Eq. 3: inner diversity minus beta times each pruned kernel's distance to its nearest member."""
    inner = sum(d[u][v] for i, u in enumerate(members) for v in members[i + 1:])
    outer = sum(min(d[p][m] for m in members) for p in range(len(d)) if p not in members)
    return inner - beta * outer


def test_beam_events_field_by_field():
    """Decisions traces hold the winning start's cuts and final candidates, every start's result and
    the final choice; full traces hold the same results plus every start's beam events."""
    rng = np.random.default_rng(12)
    d, smooth = random_case(rng, 10, high=50)
    smooth = smooth * 0.37  # a smoothness unit unlike the distances'
    kept = 8
    expected = beam_start_results(d, smooth, kept)
    events, context = traced()
    choice = smooth_beam_select(d, smooth, kept, context=context)
    winner = int(np.argmax(expected.scores))
    assert winner != 0 and choice.start == winner
    final_choice = FinalChoice(LAYER, GROUP, tuple(sorted(expected.members[winner])), expected.scores[winner], winner)
    assert events[-2:] == [expected, final_choice]
    assert {e.start for e in events[:-2]} == {winner}
    check_beam_events(events, d, smooth, kept, winner)
    full, context = traced("full")
    assert smooth_beam_select(d, smooth, kept, context=context) == choice
    assert full[-2:] == [expected, final_choice]
    assert [e.start for e in full if isinstance(e, BeamFinal)] == list(range(10))
    for start in range(10):
        check_beam_events(full, d, smooth, kept, start)


def test_baseline_events_field_by_field():
    """Each baseline emits its ranking values (floats; none for random) and kept set, then a
    final choice without score or start, under its layer and group."""
    kernels = np.array([[3.0, 4.0], [1.0, 0.0], [6.0, 8.0], [0.0, 5.0]])
    smooth = np.array([2, 9, 2, 1])  # integers: recorded as floats all the same
    random_kept = random_select(4, 2, np.random.default_rng(5)).kept
    for run, method, values, kept in (
        (lambda c: l2_select(kernels, 2, c), "l2", (5.0, 1.0, 10.0, 5.0), (0, 2)),
        (lambda c: least_smooth_select(smooth, 2, c), "least-smooth", (2.0, 9.0, 2.0, 1.0), (0, 3)),
        (lambda c: random_select(4, 2, np.random.default_rng(5), c), "random", (), tuple(random_kept)),
    ):
        events, context = traced()
        assert run(context) == Choice(list(kept))
        assert events == [RankedSelection(LAYER, GROUP, method, values, kept), FinalChoice(LAYER, GROUP, kept, None, None)]
        assert all(type(v) is float for v in events[0].values)


def test_baselines_match_naive_rankings_with_ties():
    """L2 keeps the largest norms and least-smooth the smallest smoothness, lowest index on ties,
    on rows long enough that an unstable sort would reorder ties."""
    rng = np.random.default_rng(6)
    for n in (20, 40, 64):
        smooth = rng.integers(0, 3, n).astype(float)
        kernels = np.stack([smooth, np.zeros(n)], axis=1)  # norms equal the smoothness values
        kept = n // 2
        assert least_smooth_select(smooth, kept).kept == sorted(sorted(range(n), key=lambda i: (smooth[i], i))[:kept])
        assert l2_select(kernels, kept).kept == sorted(sorted(range(n), key=lambda i: (-smooth[i], i))[:kept])


def test_random_baseline_draws_without_replacement():
    """A random choice never keeps a kernel twice, even when it keeps nearly all of them."""
    for seed in range(30):
        kept = random_select(10, 9, np.random.default_rng(seed)).kept
        assert len(set(kept)) == 9 and set(kept) <= set(range(10))
