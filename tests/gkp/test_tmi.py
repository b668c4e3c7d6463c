"""TMI-driven clustering (SPEC §3.2): equal-size k-means, balancing, each scheme's equal groups,
TMI scores, Eq. 4 ranking (both weightings), and the vote with its tie rules."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.gkp.clustering import (
    SchemeGroups,
    balance_clusters,
    cluster_filters,
    dbscan_near_count,
    equal_size_kmeans,
    flatten_filters,
    forget_clusterings,
)
from engine.gkp.prune_config import SCHEMES
from engine.gkp.tmi import (
    gap_statistics,
    rank_schemes,
    score_tickets,
    tally_votes,
    tmi_filter_scores,
    tmi_grouping,
)
from engine.gkp.traces import Clustering, TmiTicket, TmiVote, Tracer


def blobs(sizes, seed=0, spread=0.05):
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    points = np.concatenate([centres[i] + spread * rng.normal(size=(n, 2)) for i, n in enumerate(sizes)])
    return points, np.repeat(np.arange(len(sizes)), sizes)


def same_partition(a, b):
    return {frozenset(np.flatnonzero(a == v)) for v in np.unique(a)} == \
        {frozenset(np.flatnonzero(b == v)) for v in np.unique(b)}


def test_equal_size_kmeans_recovers_equal_blobs():
    points, truth = blobs([5, 5, 5, 5])
    order = np.random.default_rng(1).permutation(20)
    labels = equal_size_kmeans(points[order], 4, seed=0)
    assert same_partition(labels, truth[order])


def test_equal_size_kmeans_forces_equal_sizes_and_is_seeded():
    points, _ = blobs([9, 3, 2, 2], seed=2, spread=1.0)
    labels = equal_size_kmeans(points, 4, seed=3)
    assert np.bincount(labels).tolist() == [4, 4, 4, 4]
    assert np.array_equal(labels, equal_size_kmeans(points, 4, seed=3))


def test_balance_moves_nearest_points_to_underfull_cluster():
    # 1-D: a cluster of 4 near 0 and 2 near 10, target 3 groups of 2 -> one new group is seeded
    # with the point farthest from both centroids, then filled with its nearest surplus point.
    points = np.array([[0.0], [0.1], [0.2], [3.0], [10.0], [10.1]])
    labels = np.array([0, 0, 0, 0, 1, 1])
    assign = balance_clusters(points, labels, 3)
    assert np.bincount(assign).tolist() == [2, 2, 2]
    assert assign[3] == assign[2] and assign[4] == assign[5] and assign[0] == assign[1]


def test_balance_merges_when_there_are_too_many_clusters():
    points = np.array([[0.0], [0.1], [5.0], [9.0], [9.1], [9.2]])
    assign = balance_clusters(points, np.array([0, 0, 1, 2, 2, 2]), 2)
    assert np.bincount(assign).tolist() == [3, 3]
    assert assign[2] == assign[0] == assign[1] and assign[3] == assign[4] == assign[5]


def test_dbscan_eps_search_hits_the_target_count():
    points, truth = blobs([4, 4, 4, 4], seed=4)
    labels, eps = dbscan_near_count(points, 4)
    assert same_partition(labels, truth) and 0.0 < eps < 14.0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("shape", [(16, 4, 8), (32, 8, 4), (24, 3, 8), (8, 5, 2), (8, 2, 8), (12, 6, 1)])
def test_every_scheme_gives_equal_groups(scheme, shape):
    c_out, c_in, n = shape
    weight = torch.randn(c_out, c_in, 3, 3, generator=torch.Generator().manual_seed(c_out * c_in))
    found = cluster_filters(weight, scheme, n, seed=5)
    assert len(found.filter_groups) == n and {len(g) for g in found.filter_groups} == {c_out // n}
    assert sorted(i for g in found.filter_groups for i in g) == list(range(c_out))
    forget_clusterings()  # same seed, same groups: computed again, not remembered
    assert found.filter_groups == cluster_filters(weight, scheme, n, seed=5).filter_groups


def test_clusterings_are_remembered_by_everything_they_depend_on(monkeypatch):
    """Planning again reuses a layer's clustering; other filters, scheme, n or seed cluster again,
    and a caller changing its groups does not change what the next caller gets."""
    from engine.gkp import clustering

    calls: list[tuple[str, int, int]] = []
    compute = clustering._cluster
    monkeypatch.setattr(clustering, "_cluster", lambda filters, scheme, n, seed: (
        calls.append((scheme, n, seed)), compute(filters, scheme, n, seed))[1])
    forget_clusterings()
    weight = torch.randn(16, 4, 3, 3, generator=torch.Generator().manual_seed(3))
    first = cluster_filters(weight, "kpca", 4, seed=1)
    first.filter_groups[0].append(99)
    again = cluster_filters(weight.clone(), "kpca", 4, seed=1)
    assert calls == [("kpca", 4, 1)] and 99 not in again.filter_groups[0]
    cluster_filters(weight, "kpca", 4, seed=2)
    cluster_filters(weight, "kpca", 2, seed=1)
    cluster_filters(weight, "spectral", 4, seed=1)
    cluster_filters(weight * 1.01, "kpca", 4, seed=1)
    cluster_filters(weight.reshape(32, 2, 3, 3), "kpca", 4, seed=1)  # the same bytes as 32 filters
    assert len(calls) == 6
    forget_clusterings()
    cluster_filters(weight, "kpca", 4, seed=1)
    assert len(calls) == 7


def test_only_the_most_recent_clusterings_are_kept():
    from engine.gkp.clustering import SchemeGroups, _Remembered

    remembered = _Remembered(2)
    for key in "abc":
        remembered.put((key,), SchemeGroups("kpca", [[0]]))
    assert remembered.get(("a",)) is None and remembered.get(("b",)) is not None
    remembered.put(("d",), SchemeGroups("kpca", [[1]]))  # "b" was used last: "c" goes
    assert remembered.get(("c",)) is None and remembered.get(("b",)) is not None


@pytest.mark.parametrize("scheme", SCHEMES)
def test_identical_filters_get_contiguous_groups(scheme):
    for weight in (torch.zeros(8, 2, 3, 3), torch.ones(8, 2, 3, 3)):
        assert cluster_filters(weight, scheme, 4, seed=0).filter_groups == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_schemes_find_planted_filter_clusters():
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(4, 2, 3, 3))
    labels = np.repeat(np.arange(4), 4)
    weight = torch.from_numpy(prototypes[labels] + 0.01 * rng.normal(size=(16, 2, 3, 3)))
    expected = [list(range(i, i + 4)) for i in range(0, 16, 4)]
    for scheme in SCHEMES:
        assert cluster_filters(weight, scheme, 4, seed=0).filter_groups == expected, scheme


def test_tmi_filter_scores_by_hand():
    final = np.array([[1.0, -2.0], [0.5, 0.0]])
    tickets = np.array([[[-1.0, 1.0], [0.0, 0.0]], [[2.0, -2.0], [-1.0, 3.0]]])
    # ticket 0: | |1|-|-1| | + | |-2|-|1| | = 0 + 1; filter 1: 0.5 + 0. ticket 1: 1 + 0; 0.5 + 3.
    assert tmi_filter_scores(final, tickets).tolist() == [[1.0, 0.5], [1.0, 3.5]]


def test_gap_statistics_by_hand():
    gaps, mean, var = gap_statistics(np.array([1.0, 7.0, 4.0, 5.0]))
    assert gaps.tolist() == [2.0, 1.0, 3.0]  # sorted 7 5 4 1
    assert mean == 2.0 and var == pytest.approx(2.0 / 3.0)
    gaps, mean, var = gap_statistics(np.array([3.0]))
    assert gaps.size == 0 and mean == 0.0 and var == 0.0


def test_eq4_weighting_paper_vs_reference():
    # A: smallest mean, largest variance; B: middle, middle; C: largest mean, smallest variance.
    mean, var = np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])
    _, _, paper = rank_schemes(mean, var, 0.5, "paper")
    _, _, reference = rank_schemes(mean, var, 0.5, "reference")
    assert paper.tolist() == [2.5, 3.0, 3.5] and int(np.argmin(paper)) == 0
    assert reference.tolist() == [3.5, 3.0, 2.5] and int(np.argmin(reference)) == 2


def test_eq4_average_ranks_for_ties():
    rank_mean, rank_var, score = rank_schemes(np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.0, 0.0]), 0.5)
    assert rank_mean.tolist() == [1.5, 1.5, 3.0] and rank_var.tolist() == [2.0, 2.0, 2.0]
    assert score.tolist() == [2.5, 2.5, 4.0]


def test_score_tickets_constructed_winner():
    # Filter scores 1..8; scheme 0 pairs them evenly (group sums 9,9,9,9: no gaps), scheme 1 does not.
    scores = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    balanced = [[0, 7], [1, 6], [2, 5], [3, 4]]
    skewed = [[0, 1], [2, 3], [4, 5], [6, 7]]
    result = score_tickets(scores, [skewed, balanced], 0.5)[0]
    assert result.winner == 1
    assert result.gaps[1].tolist() == [0.0, 0.0, 0.0] and result.gaps[0].tolist() == [4.0, 4.0, 4.0]
    assert result.score.tolist() == [2 + 0.5 * 1.5, 1 + 0.5 * 1.5]  # the paper's weighting by default
    tied = score_tickets(scores, [balanced, balanced], 0.5)[0]
    assert tied.winner == 0  # equal scores: the earliest scheme


def test_vote_majority_then_longest_run_then_earliest():
    assert tally_votes([0, 1, 1, 2, 1], 3).winner == 1
    tie = tally_votes([0, 1, 1, 0, 2], 3)  # 0 and 1 have two votes; 1 won two tickets in a row
    assert tie.tally == [2, 2, 1] and tie.longest_run == [1, 2, 1] and tie.winner == 1
    assert tally_votes([1, 0, 1, 0], 2).winner == 0  # same votes, same runs: earliest
    assert tally_votes([2, 2, 0, 0], 3).winner == 0


def test_tmi_grouping_votes_once_per_ticket_and_uses_the_winner():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 4, 3, 3, generator=generator)
    tickets = torch.stack([weight + 0.1 * torch.randn(16, 4, 3, 3, generator=generator) for _ in range(5, 9)])
    scores = tmi_filter_scores(flatten_filters(weight), tickets.reshape(4, 16, -1).double().numpy())
    events = []
    found = [cluster_filters(weight, scheme, 4, 1 + index) for index, scheme in enumerate(SCHEMES)]
    result = tmi_grouping(found, [5, 6, 7, 8], scores, layer="conv", tracer=Tracer(events.append))
    clusterings = {e.scheme: e for e in events if isinstance(e, Clustering)}
    ticket_events = [e for e in events if isinstance(e, TmiTicket)]
    vote = next(e for e in events if isinstance(e, TmiVote))
    assert list(clusterings) == list(SCHEMES)
    assert [e.epoch for e in ticket_events] == [5, 6, 7, 8] == list(vote.epochs)
    assert vote.votes == tuple(e.winner for e in ticket_events)
    assert result.scheme == vote.winner
    assert result.filter_groups == [list(g) for g in clusterings[vote.winner].filter_groups]
    assert [list(e.group_scores[0]) for e in ticket_events] == [  # each ticket scored by its own filters
        [float(scores[t, g].sum()) for g in clusterings[SCHEMES[0]].filter_groups] for t in range(4)]


def test_tmi_grouping_with_one_scheme_forced_into_the_vote():
    weight = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    scores = tmi_filter_scores(flatten_filters(weight), flatten_filters(weight * 0.5)[None])
    result = tmi_grouping([cluster_filters(weight, "spectral", 2, 0)], [1], scores)
    assert result.scheme == "spectral"



def average_ranks(values) -> list[float]:
    """Rank 1 for the smallest value; tied values share the mean of the ranks they span."""
    return [1 + sum(u < v for u in values) + (sum(u == v for u in values) - 1) / 2 for v in values]


def test_tmi_grouping_traces_every_figure_by_hand_with_the_default_weighting():
    # Filter scores 1..8 for ticket 0, reversed for ticket 1; three schemes of four pairs.
    scores = np.array([[1.0, 2, 3, 4, 5, 6, 7, 8], [8.0, 7, 6, 5, 4, 3, 2, 1]])
    found = [SchemeGroups("kpca", [[0, 1], [2, 3], [4, 5], [6, 7]]),
             SchemeGroups("spectral", [[0, 7], [1, 6], [2, 3], [4, 5]]),
             SchemeGroups("tsne-dbscan", [[0, 6], [1, 7], [2, 4], [3, 5]], eps=0.25, raw_clusters=5)]
    for options in ({"layer": "conv"}, {"weighting": "reference"}):
        check_tmi_trace(found, scores, options)


def check_tmi_trace(found, scores, options):
    layer, weighting = options.get("layer", ""), options.get("weighting", "paper")
    events = []
    result = tmi_grouping(found, [35, 36], scores, tracer=Tracer(events.append), **options)
    clusterings = [e for e in events if isinstance(e, Clustering)]
    assert [(e.layer, e.scheme, e.filter_groups, e.eps, e.raw_clusters) for e in clusterings] == [
        (layer, f.scheme, tuple(tuple(g) for g in f.filter_groups), f.eps, f.raw_clusters) for f in found]
    winners = []
    for ticket, epoch in zip((e for e in events if isinstance(e, TmiTicket)), [35, 36]):
        row = scores[[35, 36].index(epoch)]
        sums = [[float(row[g].sum()) for g in f.filter_groups] for f in found]
        gaps = [[a - b for a, b in zip(sorted(s)[::-1], sorted(s)[::-1][1:])] for s in sums]
        means = [sum(g) / 3 for g in gaps]
        variances = [sum((x - m) ** 2 for x in g) / 3 for g, m in zip(gaps, means)]
        rank_mean, rank_var = average_ranks(means), average_ranks(variances)
        score = [(m + 0.5 * v) if weighting == "paper" else (0.5 * m + v)  # alpha 0.5 by default
                 for m, v in zip(rank_mean, rank_var)]
        winners.append(found[score.index(min(score))].scheme)
        assert (ticket.layer, ticket.epoch, ticket.schemes) == (layer, epoch, tuple(f.scheme for f in found))
        assert ticket.group_scores == tuple(tuple(s) for s in sums)
        assert ticket.gaps == tuple(tuple(g) for g in gaps)
        assert ticket.gap_mean == pytest.approx(tuple(means)) and ticket.gap_var == pytest.approx(tuple(variances))
        assert (ticket.rank_mean, ticket.rank_var) == (tuple(rank_mean), tuple(rank_var))
        assert ticket.score == pytest.approx(tuple(score)) and ticket.winner == winners[-1]
    (vote,) = [e for e in events if isinstance(e, TmiVote)]
    assert (vote.layer, vote.schemes, vote.epochs, vote.votes) == (layer, tuple(f.scheme for f in found), (35, 36),
                                                                   tuple(winners))
    tally = [winners.count(f.scheme) for f in found]
    assert vote.tally == tuple(tally) and vote.winner == result.scheme
    assert vote.longest_run == tuple(max((len(list(run)) for w, run in itertools.groupby(winners) if w == f.scheme),
                                         default=0) for f in found)


def test_gaps_of_single_groups_and_votes_nobody_got():
    gaps, mean, var = gap_statistics(np.array([[3.0], [4.0]]))
    assert gaps.shape == (2, 0) and mean.tolist() == [0.0, 0.0] and var.tolist() == [0.0, 0.0]
    vote = tally_votes([0, 0], 3)
    assert vote.tally == [2, 0, 0] and vote.longest_run == [2, 0, 0] and vote.winner == 0
    assert all(type(v) is int for v in vote.tally + vote.longest_run)  # whole numbers in the trace file
    assert tally_votes([], 2).tally == [0, 0]
