"""TMI-GKP's clustering schemes (SPEC §3.2): KernelPCA, spectral embedding and t-SNE + DBSCAN,
each giving n equal-size filter groups, with seeded equal-size k-means (numpy, scipy,
scikit-learn; scikit-learn is imported on first use). A process remembers its recent results,
so planning again (another rate, other selection settings) does not cluster again."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist, pdist

from .grouping import check_divisible, groups_from_labels
from .tsne import exact_tsne

SPECTRAL_NEIGHBOURS = 16
KMEANS_INITS = 10
KMEANS_MAX_ITER = 100
REMEMBERED = 1024  # clusterings kept per process: a few hundred bytes each


@dataclass(frozen=True)
class SchemeGroups:
    """One scheme's equal-size groups (ascending, ordered by first filter); `eps` and
    `raw_clusters` describe the DBSCAN step of `tsne-dbscan`."""

    scheme: str
    filter_groups: list[list[int]]
    eps: float | None = None
    raw_clusters: int | None = None


def flatten_filters(weight: Any) -> np.ndarray:
    """Filters (of a torch tensor or an array) as float64 rows of `C_in*k*k` values."""
    array = weight.detach().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight)
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
    count = len(filters)
    perplexity = float(min(max(count / groups, 1.0), count - 1))
    embedding = exact_tsne(filters, perplexity, seed)
    labels, eps = dbscan_near_count(embedding, groups)
    return balance_clusters(embedding, labels, groups), eps, int(labels.max() + 1)


class _Remembered:
    """The most recent clusterings, keyed by the filters' bytes and shape, the scheme, n and the
    seed (everything a clustering depends on); safe to share between threads."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._results: OrderedDict[tuple[Any, ...], SchemeGroups] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(filters: np.ndarray, scheme: str, groups: int, seed: int) -> tuple[Any, ...]:
        return hashlib.blake2b(filters.tobytes(), digest_size=20).digest(), filters.shape, scheme, groups, seed

    def get(self, key: tuple[Any, ...]) -> SchemeGroups | None:
        with self._lock:
            found = self._results.get(key)
            if found is not None:
                self._results.move_to_end(key)
        return found

    def put(self, key: tuple[Any, ...], result: SchemeGroups) -> None:
        with self._lock:
            self._results[key] = result
            while len(self._results) > self._size:
                self._results.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._results.clear()


_remembered = _Remembered(REMEMBERED)


def forget_clusterings() -> None:
    """Drop the remembered clusterings (for timing a first plan, or testing determinism)."""
    _remembered.clear()


def cluster_filters(weight: Any, scheme: str, groups: int, seed: int) -> SchemeGroups:
    """Equal-size filter groups of one layer by one clustering scheme (seeded); a clustering
    this process already made is reused (copied, so callers may change theirs)."""
    filters = flatten_filters(weight)
    check_divisible(len(filters), groups)
    key = _remembered.key(filters, scheme, groups, seed)
    result = _remembered.get(key)
    if result is None:
        result = _cluster(filters, scheme, groups, seed)
        _remembered.put(key, result)
    return dataclasses.replace(result, filter_groups=[list(g) for g in result.filter_groups])


def _cluster(filters: np.ndarray, scheme: str, groups: int, seed: int) -> SchemeGroups:
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
