"""TMI-driven filter clustering (SPEC §3.2): three clustering schemes that each give n equal-size
filter groups, scored against every ticket epoch by the balance of their TMI scores (Eq. 4),
with a per-ticket vote choosing the scheme for the layer."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist, pdist

from .grouping import check_divisible, groups_from_labels
from .prune_config import SCHEMES
from .traces import Clustering, TmiTicket, TmiVote, Tracer

SPECTRAL_NEIGHBOURS = 16
KMEANS_INITS = 10
KMEANS_MAX_ITER = 100


@dataclass(frozen=True)
class SchemeGroups:
    """One scheme's equal-size groups (ascending, ordered by first filter); `eps` and
    `raw_clusters` describe the DBSCAN step of `tsne-dbscan`."""

    scheme: str
    filter_groups: list[list[int]]
    eps: float | None = None
    raw_clusters: int | None = None


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


def flatten_filters(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    """Filters as float64 rows of `C_in*k*k` values."""
    array = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    return array.astype(np.float64).reshape(array.shape[0], -1)


def equal_size_kmeans(points: np.ndarray, n_clusters: int, *, seed: int,
                      n_init: int = KMEANS_INITS, max_iter: int = KMEANS_MAX_ITER) -> np.ndarray:
    """k-means whose clusters all hold exactly `len(points) / n_clusters` points: k-means++
    seeding, then centroid updates alternating with an exact balanced assignment of points to
    cluster slots. The init with the lowest inertia wins (first on ties)."""
    from sklearn.cluster import (
        kmeans_plusplus,  # sklearn imports Rich: load it only for TMI
    )
    points = np.asarray(points, dtype=np.float64)
    check_divisible(len(points), n_clusters)
    size = len(points) // n_clusters
    rng = np.random.default_rng(seed)
    best_labels, best_inertia = None, np.inf
    for _ in range(n_init):
        centers, _ = kmeans_plusplus(points, n_clusters, random_state=int(rng.integers(2**31)))
        labels = None
        for _ in range(max_iter):
            cost = cdist(points, centers, "sqeuclidean")
            _, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
            new_labels = slots // size
            if labels is not None and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            centers = np.stack([points[labels == j].mean(axis=0) for j in range(n_clusters)])
        inertia = float(((points - centers[labels]) ** 2).sum())
        if inertia < best_inertia:
            best_labels, best_inertia = labels, inertia
    assert best_labels is not None
    return best_labels


def kpca_embedding(filters: np.ndarray) -> np.ndarray:
    """KernelPCA on the precomputed kernel `0.5*(X X^T)^2 + 0.5*rbf(X)`."""
    from sklearn.decomposition import KernelPCA
    from sklearn.metrics.pairwise import rbf_kernel
    kernel = 0.5 * (filters @ filters.T) ** 2 + 0.5 * rbf_kernel(filters)
    return KernelPCA(kernel="precomputed").fit_transform(kernel)


def knn_affinity(filters: np.ndarray, neighbours: int = SPECTRAL_NEIGHBOURS) -> np.ndarray:
    """Mutual k-NN graph on the cosine similarity of L2-normalised filters, edges weighted by
    `(1 + cos) / 2` so they are non-negative."""
    norms = np.linalg.norm(filters, axis=1, keepdims=True)
    unit = filters / np.maximum(norms, np.finfo(np.float64).tiny)
    cosine = np.clip(unit @ unit.T, -1.0, 1.0)
    count = len(filters)
    k = min(neighbours, count - 1)
    ranked = np.argsort(-cosine + 3.0 * np.eye(count), axis=1, kind="stable")[:, :k]
    near = np.zeros((count, count), dtype=bool)
    near[np.arange(count)[:, None], ranked] = True
    return np.where(near & near.T, (1.0 + cosine) / 2.0, 0.0)


def spectral_groups(filters: np.ndarray, groups: int, seed: int) -> np.ndarray:
    """Spectral embedding of the mutual k-NN graph, then equal-size k-means; returns labels."""
    from sklearn.manifold import spectral_embedding
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        embedding = spectral_embedding(knn_affinity(filters), n_components=groups,
                                       random_state=seed, drop_first=False)
    return equal_size_kmeans(embedding, groups, seed=seed)


def dbscan_near_count(points: np.ndarray, target: int) -> tuple[np.ndarray, float]:
    """DBSCAN (min_samples=1, so no noise and the cluster count falls as eps grows) with eps
    searched among midpoints of the sorted pairwise distances so the count is nearest `target`
    (the larger count on a tie). Returns the labels and eps."""
    from sklearn.cluster import DBSCAN
    distances = np.unique(pdist(points))
    candidates = np.concatenate([[distances[0] / 2], (distances[:-1] + distances[1:]) / 2, [distances[-1] * 2]])

    def run(eps: float) -> np.ndarray:
        return DBSCAN(eps=max(float(eps), 1e-300), min_samples=1).fit(points).labels_

    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # smallest candidate whose cluster count is <= target
        mid = (lo + hi) // 2
        if run(candidates[mid]).max() + 1 <= target:
            hi = mid
        else:
            lo = mid + 1
    labels = run(candidates[lo])
    if lo > 0:
        above = run(candidates[lo - 1])
        if abs(above.max() + 1 - target) <= abs(labels.max() + 1 - target):
            return above, float(candidates[lo - 1])
    return labels, float(candidates[lo])


def balance_clusters(points: np.ndarray, labels: np.ndarray, groups: int) -> np.ndarray:
    """Make `groups` clusters of equal size from arbitrary `labels`: the largest clusters are
    kept (the rest join a free pool), empty ones are seeded with the free or surplus point
    farthest from every centroid, then the free or surplus point nearest to an underfull
    cluster's centroid moves there, one at a time, until all are full."""
    count = len(points)
    size = count // groups
    clusters = sorted((np.flatnonzero(labels == lab) for lab in np.unique(labels)),
                      key=lambda members: (-len(members), members[0]))
    assign = np.full(count, -1)
    for index, members in enumerate(clusters[:groups]):
        assign[members] = index

    def counts() -> np.ndarray:
        return np.bincount(assign[assign >= 0], minlength=groups)

    def movable() -> np.ndarray:
        sizes = counts()
        surplus = (assign >= 0) & (sizes[np.maximum(assign, 0)] > size)
        return np.flatnonzero((assign < 0) | surplus)

    def centroid(cluster: int) -> np.ndarray:
        return points[assign == cluster].mean(axis=0)

    while (sizes := counts()).min() == 0:
        filled = np.flatnonzero(sizes > 0)
        free = movable()
        nearest = cdist(points[free], np.stack([centroid(c) for c in filled])).min(axis=1)
        assign[free[int(np.argmax(nearest))]] = int(np.flatnonzero(sizes == 0)[0])
    while (under := np.flatnonzero(counts() < size)).size:
        free = movable()
        distance = cdist(points[free], np.stack([centroid(c) for c in under]))
        row, col = np.unravel_index(int(np.argmin(distance)), distance.shape)
        assign[free[row]] = under[col]
    return assign


def tsne_dbscan_groups(filters: np.ndarray, groups: int, seed: int) -> tuple[np.ndarray, float, int]:
    """2-D t-SNE (perplexity about C_out/n, below the filter count), DBSCAN with eps searched for
    about n clusters, then balancing. Returns labels, eps and the raw cluster count."""
    from sklearn.manifold import TSNE
    count = len(filters)
    perplexity = float(min(max(count / groups, 1.0), count - 1))
    embedding = TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact",
                     random_state=seed).fit_transform(filters)
    labels, eps = dbscan_near_count(embedding, groups)
    return balance_clusters(embedding, labels, groups), eps, int(labels.max() + 1)


def cluster_filters(weight: torch.Tensor | np.ndarray, scheme: str, groups: int, seed: int) -> SchemeGroups:
    """Equal-size filter groups of one layer by one clustering scheme (seeded)."""
    filters = flatten_filters(weight)
    check_divisible(len(filters), groups)
    if groups in (1, len(filters)) or (filters == filters[0]).all():
        # one partition into equal groups exists, or identical filters make every one as good
        return SchemeGroups(scheme, groups_from_labels(np.arange(len(filters)) * groups // len(filters), groups))
    if scheme == "kpca":
        return SchemeGroups(scheme, groups_from_labels(equal_size_kmeans(kpca_embedding(filters), groups, seed=seed), groups))
    if scheme == "spectral":
        return SchemeGroups(scheme, groups_from_labels(spectral_groups(filters, groups, seed), groups))
    if scheme == "tsne-dbscan":
        labels, eps, raw = tsne_dbscan_groups(filters, groups, seed)
        return SchemeGroups(scheme, groups_from_labels(labels, groups), eps, raw)
    raise ValueError(f"unknown clustering scheme {scheme!r}")


def tmi_filter_scores(final: np.ndarray, tickets: np.ndarray) -> np.ndarray:
    """TMI score of every filter for every ticket, `sum | |w_final| - |w_k| |`: shape (T, C_out)
    from flattened `final` (C_out, F) and `tickets` (T, C_out, F)."""
    return np.abs(np.abs(final)[None] - np.abs(tickets)).sum(axis=-1)


def gap_statistics(group_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaps between consecutive group scores sorted descending (last axis), their mean and
    population variance (0 when there is a single group)."""
    ordered = -np.sort(-group_scores, axis=-1)
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

    rank_mean = rankdata(gap_mean, method="average", axis=-1)
    rank_var = rankdata(gap_var, method="average", axis=-1)
    if weighting == "reference":
        return rank_mean, rank_var, alpha * rank_mean + rank_var
    return rank_mean, rank_var, rank_mean + alpha * rank_var


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
    run = 0
    for index, winner in enumerate(winners):
        run = run + 1 if index and winners[index - 1] == winner else 1
        longest[winner] = max(longest[winner], run)
    contenders = np.flatnonzero(tally == tally.max())
    best = contenders[np.argmax(longest[contenders])]
    return VoteResult(tally.tolist(), longest.tolist(), int(best))


def tmi_grouping(weight: torch.Tensor, epochs: Sequence[int], filter_scores: np.ndarray, groups: int, *,
                 schemes: Sequence[str] = SCHEMES, seed: int = 0, alpha: float = 0.5,
                 weighting: str = "paper", layer: str = "", tracer: Tracer | None = None) -> TmiGrouping:
    """TMI-GKP Stage 1 for one layer: cluster once per scheme, score every ticket (`epochs[t]`,
    with its filters' TMI scores `filter_scores[t]`) against every clustering, and use the scheme
    the tickets vote for."""
    found = [cluster_filters(weight, scheme, groups, seed + index) for index, scheme in enumerate(schemes)]
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
