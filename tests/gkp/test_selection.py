"""Stage 2 selection: the vectorised greedy and smooth beam against naive implementations written
here from SPEC §4, hand-checked tiny cases, tie rules, compat β, and the baselines."""

from __future__ import annotations

import math
import threading
from itertools import combinations

import numpy as np
import pytest
import torch

from engine.common.errors import Cancelled
from engine.gkp.selection import (
    Choice,
    GroupContext,
    gamma_count,
    greedy_select,
    grouped_kernels,
    kernel_distances,
    l2_select,
    least_smooth_select,
    pair_beta,
    random_select,
    smooth_beam_select,
    to_fixed_point,
)
from engine.gkp.traces import BeamCut, BeamFinal, FinalChoice, StartResults, Tracer


def inner(d, members):
    return sum(d[u][v] for u, v in combinations(members, 2))


def nearest_outer(d, members, gamma=1):
    return sum(sum(sorted(d[p][s] for s in members)[:gamma]) for p in range(len(d)) if p not in members)


def best_next(d, members):
    """Kernels outside `members` by summed distance to it, largest first, lowest index on ties."""
    sums = [(sum(d[x][v] for v in members), x) for x in range(len(d)) if x not in members]
    return [x for _, x in sorted(sums, key=lambda t: (-t[0], t[1]))]


def naive_greedy(d, kept, gamma_ratio=0.2, beta="auto", floor=True):
    c_in = len(d)
    gamma = math.floor(gamma_ratio * kept + 1e-9)
    gamma = max(1, gamma) if floor else gamma
    if beta == "auto":
        beta = math.comb(kept, 2) / ((c_in - kept) * gamma) if c_in > kept and gamma else 0.0
    results = []
    for start in range(c_in):
        members = [start]
        while len(members) < kept:
            members.append(best_next(d, members)[0])
        results.append((inner(d, members) - beta * nearest_outer(d, members, gamma), members))
    best = max(range(c_in), key=lambda s: (results[s][0], -s))
    return results, best


def naive_beam(d, smooth, kept, width=2, check_every=3, alpha=0.9, freeze=False, final_cut=False):
    """The winning (cost, start, members) over every start's complete candidates."""
    per_start = naive_beam_starts(d, smooth, kept, width, check_every, alpha, freeze, final_cut)
    flat = [(c, s, i, v) for s, cands in enumerate(per_start) for i, (c, v) in enumerate(cands)]
    best = max(flat, key=lambda t: (t[0], -t[1], -t[2]))
    return best[0], best[1], best[3]


def naive_beam_starts(d, smooth, kept, width=2, check_every=3, alpha=0.9, freeze=False, final_cut=False):
    """Per start kernel, its complete candidates as (Eq. 3 cost, members in build order)."""
    c_in = len(d)

    def beta(m):
        if freeze and check_every + 1 < kept:
            m = check_every + 1
        return math.comb(m, 2) / (c_in - m) if c_in > m else 0.0

    def cost(members):
        return inner(d, members) - beta(len(members)) * nearest_outer(d, members)

    per_start = []
    for start in range(c_in):
        beam = [[start]]
        while len(beam[0]) < kept:
            beam = [entry + [x] for entry in beam for x in best_next(d, entry)[:width]]
            m = len(beam[0])
            if (m < kept or final_cut) and (m - 1) % check_every == 0:
                costs = [cost(v) for v in beam]
                smooths = [sum(smooth[i] for i in v) for v in beam]
                rank_cost = [sum(c2 > c for c2 in costs) for c in costs]
                rank_smooth = [sum(s2 < s for s2 in smooths) for s in smooths]
                score = [alpha * a + (1 - alpha) * b for a, b in zip(rank_cost, rank_smooth)]
                order = sorted(range(len(beam)), key=lambda i: (score[i], -smooths[i], i))
                beam = [beam[i] for i in order[:width]]
        per_start.append([(cost(v), v) for v in beam])
    return per_start


def random_case(rng, c_in, high=6):
    upper = np.triu(rng.integers(0, high, (c_in, c_in)), 1).astype(float)
    return upper + upper.T, rng.integers(0, 5, c_in).astype(float)


def recorder():
    events = []
    return events, GroupContext(Tracer(events.append, "decisions"), "conv", 0)


def test_greedy_hand_checked_line():
    # five kernels on a line at 0, 1, 2, 3, 10: distances |x_u - x_v|, keep 3, gamma 1.
    x = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    d = np.abs(x[:, None] - x[None, :])
    events, context = recorder()
    choice = greedy_select(d, 3, context=context)
    # beta = C(3,2) / (2 * 1) = 1.5. Start 0 adds 10 (dist 10), then 1, 2, 3 all sum to 10: 1 wins.
    # {0,10,1}: inner 10+1+9 = 20, pruned 2 and 3 are 1 and 2 from kept 1 -> score 20 - 1.5*3 = 15.5.
    # Start 2 adds 10, then 0 (sum 12): {2,10,0} inner 20, pruned 1 (1) and 3 (1) -> 20 - 3 = 17.
    results = next(e for e in events if isinstance(e, StartResults))
    assert results.members[0] == (0, 4, 1) and results.scores[0] == pytest.approx(15.5)
    assert results.members[2] == (2, 4, 0) and results.scores[2] == pytest.approx(17.0)
    assert choice == Choice([0, 2, 4], 17.0, 2)  # starts 3 and 4 reach the same 17; 2 is first
    assert results.beta == 1.5 and results.gamma == 1


@pytest.mark.parametrize("seed", range(16))
def test_greedy_matches_naive(seed):
    rng = np.random.default_rng(seed)
    c_in = int(rng.integers(5, 11))
    kept = int(rng.integers(2, c_in))
    d, _ = random_case(rng, c_in)
    ratio = float(rng.choice([0.2, 0.5]))
    floor = seed % 2 == 0
    events, context = recorder()
    choice = greedy_select(d, kept, gamma_ratio=ratio, floor_gamma=floor, context=context)
    expected, best = naive_greedy(d, kept, ratio, floor=floor)
    results = next(e for e in events if isinstance(e, StartResults))
    assert list(results.scores) == [s for s, _ in expected]
    assert [list(m) for m in results.members] == [m for _, m in expected]
    assert choice.start == best and choice.kept == sorted(expected[best][1])


def test_greedy_explicit_beta_and_gamma():
    rng = np.random.default_rng(5)
    d, _ = random_case(rng, 10, high=20)
    expected, best = naive_greedy(d, 6, gamma_ratio=0.5, beta=0.7)
    choice = greedy_select(d, 6, gamma_ratio=0.5, beta=0.7)
    assert gamma_count(6, 0.5) == 3
    assert choice.start == best and choice.score == expected[best][0]


@pytest.mark.parametrize("seed", range(40))
def test_smooth_beam_matches_naive(seed):
    rng = np.random.default_rng(100 + seed)
    c_in = int(rng.integers(5, 10))
    kept = int(rng.integers(2, c_in + 1))
    width = int(rng.integers(1, 4))
    check_every = int(rng.integers(1, 4))
    freeze = bool(rng.integers(0, 2))
    final_cut = seed % 4 == 1
    d, smooth = random_case(rng, c_in, high=2 + seed % 5)  # small ranges: many ties
    choice = smooth_beam_select(d, smooth, kept, beam_width=width, check_every=check_every, alpha=0.9,
                                freeze_beta=freeze, cut_at_final=final_cut)
    cost, start, members = naive_beam(d, smooth, kept, width, check_every, 0.9, freeze, final_cut)
    assert (choice.score, choice.start, choice.kept) == (cost, start, sorted(members))


def test_smooth_beam_matches_naive_on_real_kernels():
    weight = torch.randn(16, 7, 3, 3, dtype=torch.float64)
    kernels = grouped_kernels(weight, [0, 3, 5, 9])
    d = kernel_distances(kernels)
    smooth = np.abs(kernels).sum(axis=1)
    choice = smooth_beam_select(d, smooth, 5)
    cost, start, members = naive_beam(d.tolist(), smooth.tolist(), 5)
    assert choice.start == start and choice.kept == sorted(members)
    assert choice.score == pytest.approx(cost, rel=1e-12)


def test_beam_cuts_at_spec_sizes_with_eight_candidates():
    rng = np.random.default_rng(7)
    d, smooth = random_case(rng, 16, high=50)
    events, context = recorder()
    choice = smooth_beam_select(d, smooth, 9, context=context)
    cuts = [e for e in events if isinstance(e, BeamCut)]
    final = next(e for e in events if isinstance(e, BeamFinal))
    assert [c.size for c in cuts] == [4, 7]  # m = 1 + 3j, never at the complete size 9
    assert [len(c.candidates) for c in cuts] == [8, 16]
    assert all(sum(x.survived for x in c.candidates) == 2 for c in cuts)
    assert len(final.candidates) == 8 and all(len(x.members) == 9 for x in final.candidates)
    assert {c.start for c in cuts} == {final.start} == {choice.start}  # decisions: winner only
    assert final.candidates[final.best].cost == choice.score
    assert cuts[0].beta == pair_beta(4, 16) and final.beta == pair_beta(9, 16)


def test_cut_survivors_follow_score_then_rougher_then_first():
    straddling = 0
    for seed in range(30):
        rng = np.random.default_rng(300 + seed)
        d, smooth = random_case(rng, 8, high=4)
        events = []
        smooth_beam_select(d, smooth, 7, beam_width=2, check_every=2, alpha=0.5,
                           context=GroupContext(Tracer(events.append, "full"), "conv", 0))
        for cut in (e for e in events if isinstance(e, BeamCut)):
            order = sorted(range(len(cut.candidates)),
                           key=lambda i: (cut.candidates[i].score, -cut.candidates[i].smoothness, i))
            assert {i for i, c in enumerate(cut.candidates) if c.survived} == set(order[:2])
            last, first_out = cut.candidates[order[1]], cut.candidates[order[2]]
            straddling += last.score == first_out.score and last.smoothness != first_out.smoothness
    assert straddling > 0  # the rougher-wins rule decided at least one cut


def test_equal_costs_share_a_rank():
    d = np.array([[0, 5, 5, 1], [5, 0, 2, 3], [5, 2, 0, 3], [1, 3, 3, 0]], dtype=float)
    smooth = np.array([0.0, 1.0, 4.0, 0.0])
    # From start 0, kernels 1 and 2 tie at distance 5, and {0,1} and {0,2} tie on Eq. 3 cost at
    # m = 2 (5 - 0.5 * 3): both get cost rank 0 and, with alpha = 1, the same score.
    events = []
    context = GroupContext(Tracer(events.append, "full"), "conv", 0)
    smooth_beam_select(d, smooth, 3, beam_width=2, check_every=1, alpha=1.0, context=context)
    cut = next(e for e in events if isinstance(e, BeamCut) and e.start == 0 and e.size == 2)
    by_members = {c.members: c for c in cut.candidates}
    assert by_members[(0, 1)].cost == by_members[(0, 2)].cost
    assert by_members[(0, 1)].rank_cost == by_members[(0, 2)].rank_cost == 0
    assert by_members[(0, 1)].score == by_members[(0, 2)].score


def test_frozen_beta_changes_the_pick():
    rng = np.random.default_rng(11)
    for _ in range(50):
        d, smooth = random_case(rng, 12, high=40)
        paper = smooth_beam_select(d, smooth, 9)
        frozen = smooth_beam_select(d, smooth, 9, freeze_beta=True)
        if paper.kept != frozen.kept:
            break
    else:
        pytest.fail("freezing beta never changed the choice")
    events, context = recorder()
    smooth_beam_select(d, smooth, 9, freeze_beta=True, context=context)
    results = next(e for e in events if isinstance(e, StartResults))
    assert results.beta == pair_beta(4, 12) != pair_beta(9, 12)
    cost, start, members = naive_beam(d, smooth, 9, freeze=True)
    assert (frozen.score, frozen.start, frozen.kept) == (cost, start, sorted(members))


def test_reference_cuts_again_at_the_final_size():
    # S = 10 with check_every = 3 (rate 0.375 of 16 kernels under compat reference): the reference
    # code cuts at 4, 7 and 10, so each start ends with 2 candidates, not 16.
    rng = np.random.default_rng(21)
    changed = 0
    for _ in range(30):
        d, smooth = random_case(rng, 16, high=30)
        events, context = recorder()
        choice = smooth_beam_select(d, smooth, 10, freeze_beta=True, cut_at_final=True, alpha=0.2, context=context)
        cost, start, members = naive_beam(d, smooth, 10, alpha=0.2, freeze=True, final_cut=True)
        assert (choice.score, choice.start, choice.kept) == (cost, start, sorted(members))
        changed += choice.kept != smooth_beam_select(d, smooth, 10, freeze_beta=True, alpha=0.2).kept
    assert changed > 0  # the extra cut decides some groups differently
    cuts = [e for e in events if isinstance(e, BeamCut)]
    final = next(e for e in events if isinstance(e, BeamFinal))
    assert [c.size for c in cuts] == [4, 7, 10] and len(cuts[-1].candidates) == 16
    survivors = [c.members for c in cuts[-1].candidates if c.survived]
    assert [c.members for c in final.candidates] == survivors and len(survivors) == 2
    assert cuts[-1].beta == final.beta == pair_beta(4, 16)  # the frozen beta, also at the last cut
    # without the quirk the same schedule never cuts at the complete size
    events, context = recorder()
    smooth_beam_select(d, smooth, 10, freeze_beta=True, alpha=0.2, context=context)
    assert [e.size for e in events if isinstance(e, BeamCut)] == [4, 7]


def test_reference_gamma_has_no_floor():
    # S = 2 (rate 0.875 of 16 kernels under compat reference): gamma = floor(0.2 * 2) = 0, so the
    # outer-coverage term vanishes and a start scores its inner diversity alone.
    rng = np.random.default_rng(22)
    changed = 0
    for _ in range(20):
        d, _ = random_case(rng, 16, high=30)
        events, context = recorder()
        choice = greedy_select(d, 2, floor_gamma=False, context=context)
        results = next(e for e in events if isinstance(e, StartResults))
        expected, best = naive_greedy(d, 2, floor=False)
        assert (results.gamma, results.beta) == (0, 0.0)
        assert list(results.scores) == [inner(d, m) for _, m in expected] == [s for s, _ in expected]
        assert choice.start == best and choice.kept == sorted(expected[best][1])
        changed += choice.kept != greedy_select(d, 2).kept
    assert gamma_count(2, 0.2) == 1 and gamma_count(2, 0.2, floor=False) == 0
    assert changed > 0


def test_same_set_scores_equal_whatever_its_build_order():
    # Fixed point makes running sums exact: every start that ends in the same set scores the same.
    weight = torch.randn(8, 24, 3, 3, dtype=torch.float64)
    d = kernel_distances(grouped_kernels(weight, list(range(8))))
    events, context = recorder()
    greedy_select(d, 20, context=context)
    results = next(e for e in events if isinstance(e, StartResults))
    by_set: dict[tuple, set] = {}
    for members, score in zip(results.members, results.scores):
        by_set.setdefault(tuple(sorted(members)), set()).add(score)
    assert all(len(scores) == 1 for scores in by_set.values())
    assert len(by_set) < len(results.members)  # several starts did converge to the same set


def test_fixed_point_is_exact_for_power_of_two_scaling():
    values = np.array([0.0, 1.5, 3.25, 7.0])
    q, unit = to_fixed_point(values, 16)
    assert np.array_equal(q * unit, values)
    assert unit == 2.0 ** math.frexp(7.0)[1] / 2 ** (62 - math.ceil(math.log2(17)))
    assert int(q.max()) * 16 < 2**62


def test_keep_everything_and_keep_one():
    rng = np.random.default_rng(3)
    d, smooth = random_case(rng, 6)
    assert smooth_beam_select(d, smooth, 6).kept == list(range(6))
    assert greedy_select(d, 6).kept == list(range(6))
    one = smooth_beam_select(d, smooth, 1)
    assert one == Choice([0], 0.0, 0)  # every single kernel scores 0 (beta_1 = 0): earliest wins


def test_baselines():
    kernels = np.array([[3.0, 4.0], [1.0, 0.0], [6.0, 8.0], [0.0, 5.0]])  # norms 5, 1, 10, 5
    assert l2_select(kernels, 2).kept == [0, 2]  # 10, then the first of the two 5s
    assert l2_select(kernels, 3).kept == [0, 2, 3]
    smooth = np.array([2.0, 9.0, 2.0, 0.5])
    assert least_smooth_select(smooth, 2).kept == [0, 3]  # prunes the roughest (1) and ties keep order
    first = random_select(10, 4, np.random.default_rng(1))
    assert first == random_select(10, 4, np.random.default_rng(1))
    assert len(first.kept) == 4 and len(set(first.kept)) == 4 and first.score is None
    assert random_select(10, 4, np.random.default_rng(2)).kept != first.kept or \
        random_select(10, 4, np.random.default_rng(3)).kept != first.kept


def test_baseline_events():
    events, context = recorder()
    l2_select(np.eye(3), 2, context)
    assert events[0].method == "l2" and events[0].kept == (0, 1) and len(events[0].values) == 3
    assert isinstance(events[1], FinalChoice) and events[1].score is None


def test_rejects_impossible_kept_counts():
    d = np.zeros((4, 4))
    with pytest.raises(ValueError):
        greedy_select(d, 5)
    with pytest.raises(ValueError):
        smooth_beam_select(d, np.zeros(4), 0)


def test_colliding_set_keys_fall_back_to_exact_sets(monkeypatch):
    # Sets are told apart by random 64-bit keys, checked on their membership bits; with every key
    # equal, every comparison collides and the exact path must still give the naive results.
    from engine.gkp import search

    class Colliding(search._Keys):
        def __init__(self, groups, channels):
            super().__init__(groups, channels)
            self.kernel[:] = 0

    monkeypatch.setattr(search, "_Keys", Colliding)
    rng = np.random.default_rng(77)
    for _ in range(6):
        d, smooth = random_case(rng, 9, high=4)
        choice = smooth_beam_select(d, smooth, 6, beam_width=2, check_every=2)
        cost, start, members = naive_beam(d, smooth, 6, 2, 2)
        assert (choice.score, choice.start, choice.kept) == (cost, start, sorted(members))
        expected, best = naive_greedy(d, 6)
        assert greedy_select(d, 6).kept == sorted(expected[best][1])


def test_selections_stop_when_cancelled():
    weight = torch.randn(8, 12, 3, 3, dtype=torch.float64)
    d = kernel_distances(grouped_kernels(weight, list(range(8))))
    smooth = np.random.default_rng(0).random(12)
    cancel = threading.Event()
    cancel.set()
    for select in (lambda: smooth_beam_select(d, smooth, 6, cancel=cancel), lambda: greedy_select(d, 6, cancel=cancel),
                   lambda: smooth_beam_select(d, smooth, 6, cancel=cancel, context=recorder()[1])):
        with pytest.raises(Cancelled):
            select()


def test_the_beams_defaults_are_the_papers():
    # Beam width 2, a check every 3 kernels, alpha 0.9, beta re-derived at every cut: each default
    # decides some of these problems differently from its neighbour.
    problems = []
    for seed in range(12):
        rng = np.random.default_rng(seed)
        weight = torch.from_numpy(rng.standard_normal((4, 16, 3, 3)))
        problems.append((kernel_distances(grouped_kernels(weight, list(range(4)))), rng.random(16)))
    default = [smooth_beam_select(d, s, 9) for d, s in problems]
    explicit = dict(beam_width=2, check_every=3, alpha=0.9, freeze_beta=False, cut_at_final=False)
    assert [smooth_beam_select(d, s, 9, **explicit) for d, s in problems] == default
    for key, other in (("beam_width", 3), ("check_every", 4), ("alpha", 0.5), ("freeze_beta", True)):
        changed = [smooth_beam_select(d, s, 9, **{**explicit, key: other}) for d, s in problems]
        assert changed != default, key


@pytest.mark.parametrize("width", [1, 5, 16, 40])
def test_first_equal_entry_per_row(width):
    """Each entry's first equal entry in its row, on rows long enough for numpy's unstable sorts to
    reorder ties (what the trace's set rows are numbered by)."""
    from engine.gkp.selection import _first_equal

    values = np.random.default_rng(width).integers(0, 6, size=(30, width))
    expected = [[row.index(v) for v in row] for row in values.tolist()]
    assert _first_equal(values).tolist() == expected
