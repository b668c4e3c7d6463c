"""TMI-driven filter grouping (SPEC §3.2): the clustering schemes' groups (`clustering.py`) scored
against every ticket epoch by the balance of their TMI scores (Eq. 4), with a per-ticket vote
choosing the scheme for the layer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .clustering import SchemeGroups
from .traces import Clustering, TmiTicket, TmiVote, Tracer


@dataclass(frozen=True)
class TicketScores:
    """Eq. 4 for one ticket: per scheme the gap mean and variance, their ranks and the score."""

    group_scores: np.ndarray
    gaps: np.ndarray
    gap_mean: np.ndarray
    gap_var: np.ndarray
    rank_mean: np.ndarray
    rank_var: np.ndarray
    score: np.ndarray
    winner: int


@dataclass(frozen=True)
class VoteResult:
    """The tickets' tally and longest consecutive-win run per scheme, and the winning index."""

    tally: list[int]
    longest_run: list[int]
    winner: int


@dataclass(frozen=True)
class TmiGrouping:
    """The scheme TMI chose for a layer and its groups."""

    scheme: str
    filter_groups: list[list[int]]


def tmi_filter_scores(final: np.ndarray, tickets: np.ndarray) -> np.ndarray:
    """TMI score of every filter for every ticket, `sum | |w_final| - |w_k| |`: shape (T, C_out)
    from flattened `final` (C_out, F) and `tickets` (T, C_out, F)."""
    return np.abs(np.abs(final)[None] - np.abs(tickets)).sum(axis=-1)


def gap_statistics(group_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaps between consecutive group scores sorted descending (last axis), their mean and
    population variance (0 when there is a single group)."""
    ordered = -np.sort(-group_scores)  # along the last axis
    gaps = ordered[..., :-1] - ordered[..., 1:]
    if gaps.shape[-1] == 0:
        zeros = np.zeros(gaps.shape[:-1])
        return gaps, zeros, zeros
    return gaps, gaps.mean(axis=-1), gaps.var(axis=-1)


def rank_schemes(gap_mean: np.ndarray, gap_var: np.ndarray, alpha: float,
                 weighting: str = "paper") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eq. 4 on the last axis: average ranks (1 = smallest) of gap mean and variance, and
    `R(mean) + alpha*R(var)` (`paper`) or `alpha*R(mean) + R(var)` (`reference`)."""
    from scipy.stats import rankdata  # scipy.stats takes a third of a second to import

    rank_mean = rankdata(gap_mean, axis=-1)  # scipy's default method: ties share the average rank
    rank_var = rankdata(gap_var, axis=-1)
    if weighting == "paper":
        return rank_mean, rank_var, rank_mean + alpha * rank_var
    return rank_mean, rank_var, alpha * rank_mean + rank_var


def score_tickets(filter_scores: np.ndarray, clusterings: Sequence[Sequence[Sequence[int]]],
                  alpha: float, weighting: str = "paper") -> list[TicketScores]:
    """Eq. 4 for every ticket (rows of `filter_scores`) against every clustering; each ticket's
    winner is the lowest score, the earliest clustering on ties."""
    group_scores = np.stack([
        np.stack([filter_scores[:, list(group)].sum(axis=1) for group in groups], axis=1)
        for groups in clusterings
    ], axis=1)  # (T, schemes, n)
    gaps, mean, var = gap_statistics(group_scores)
    rank_mean, rank_var, score = rank_schemes(mean, var, alpha, weighting)
    return [
        TicketScores(group_scores[t], gaps[t], mean[t], var[t], rank_mean[t], rank_var[t],
                     score[t], int(np.argmin(score[t])))
        for t in range(len(filter_scores))
    ]


def tally_votes(winners: Sequence[int], n_schemes: int) -> VoteResult:
    """Most votes wins; ties go to the longest run of consecutive ticket wins, then the earliest
    scheme."""
    tally = np.bincount(np.asarray(winners, dtype=np.int64), minlength=n_schemes)
    longest = np.zeros(n_schemes, dtype=np.int64)
    for winner, streak in itertools.groupby(winners):
        longest[winner] = max(longest[winner], len(list(streak)))
    contenders = np.flatnonzero(tally == tally.max())
    best = contenders[np.argmax(longest[contenders])]
    return VoteResult(tally.tolist(), longest.tolist(), int(best))


def tmi_grouping(found: Sequence[SchemeGroups], epochs: Sequence[int], filter_scores: np.ndarray, *,
                 alpha: float = 0.5, weighting: str = "paper", layer: str = "",
                 tracer: Tracer | None = None) -> TmiGrouping:
    """TMI-GKP Stage 1 for one layer, given each scheme's clustering (`found`, in scheme order):
    score every ticket (`epochs[t]`, with its filters' TMI scores `filter_scores[t]`) against
    every clustering, and use the scheme the tickets vote for."""
    schemes = [result.scheme for result in found]
    if tracer is not None:
        for result in found:
            tracer.emit(Clustering(layer, result.scheme, _tuples(result.filter_groups), result.eps, result.raw_clusters))
    per_ticket = score_tickets(filter_scores, [r.filter_groups for r in found], alpha, weighting)
    if tracer is not None:
        for epoch, result in zip(epochs, per_ticket):
            tracer.emit(TmiTicket(
                layer, int(epoch), tuple(schemes), _tuples(result.group_scores.tolist()),
                _tuples(result.gaps.tolist()), tuple(result.gap_mean.tolist()), tuple(result.gap_var.tolist()),
                tuple(result.rank_mean.tolist()), tuple(result.rank_var.tolist()),
                tuple(result.score.tolist()), schemes[result.winner],
            ))
    vote = tally_votes([r.winner for r in per_ticket], len(schemes))
    if tracer is not None:
        tracer.emit(TmiVote(layer, tuple(schemes), tuple(int(e) for e in epochs),
                            tuple(schemes[r.winner] for r in per_ticket), tuple(vote.tally),
                            tuple(vote.longest_run), schemes[vote.winner]))
    return TmiGrouping(schemes[vote.winner], found[vote.winner].filter_groups)


def _tuples(rows: Sequence[Sequence]) -> tuple[tuple, ...]:
    return tuple(tuple(row) for row in rows)
