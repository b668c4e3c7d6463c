"""Exact t-SNE as scikit-learn computes it, about twice as fast: its exact gradient loops in Python
over the points, one BLAS vector-matrix product each; here one batched product makes the same
BLAS call on the same numbers for every point, so the embedding is scikit-learn's bit for bit.
That is checked in each process, per point count and dtype, against scikit-learn's own gradient
before it is used; where the check fails (another BLAS, another scikit-learn), scikit-learn's
own gradient runs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.spatial.distance import pdist, squareform

try:  # what pdist(..., "sqeuclidean") calls; checked with the rest of the gradient before use
    from scipy.spatial._distance_pybind import (
        pdist_sqeuclidean as _compiled_sqeuclidean,
    )
except ImportError:  # pragma: no cover (another scipy layout: pdist itself)
    _compiled_sqeuclidean = None

_EPSILON = np.finfo(np.double).eps  # scikit-learn's floor for P and Q
_PROBE_SEED = 0x75E7  # the probes' random inputs; any value checks the same code path
Gradient = Callable[..., tuple[float, np.ndarray]]

_lock = threading.Lock()
_checked: dict[tuple[int, str], bool] = {}


def exact_tsne(points: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D exact t-SNE of `points` with PCA initialisation, as `sklearn.manifold.TSNE(method=
    "exact", init="pca")` returns it."""
    from sklearn.manifold import TSNE, _t_sne

    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact", random_state=seed)
    with _lock:  # scikit-learn's module names its gradient; swap it for this call only
        own = getattr(_t_sne, "_kl_divergence", None)
        if own is None or not all(_same_as(own, len(points), dtype) for dtype in (np.float32, np.float64)):
            return tsne.fit_transform(points)
        _t_sne._kl_divergence = _batched(own)
        try:
            return tsne.fit_transform(points)
        finally:
            _t_sne._kl_divergence = own


def _batched(own: Gradient) -> Gradient:
    """The KL divergence and its gradient (van der Maaten 2008, Student-t with `dof`), each point's
    row `sum_j PQd[i, j] * (y_i - y_j)` computed for all points by one stacked `matmul`."""

    def gradient(params: np.ndarray, P: np.ndarray, dof: float, n_samples: int, n_components: int,
                 skip_num_points: int = 0, compute_error: bool = True) -> tuple[float, np.ndarray]:
        if skip_num_points:
            return own(params, P, dof, n_samples, n_components, skip_num_points, compute_error)
        embedded = params.reshape(n_samples, n_components)
        dist = _squared_distances(embedded)
        dist /= dof
        dist += 1.0
        dist **= (dof + 1.0) / -2.0
        Q = np.maximum(dist / (2.0 * np.sum(dist)), _EPSILON)
        error = 2.0 * np.dot(P, np.log(np.maximum(P, _EPSILON) / Q)) if compute_error else np.nan
        weights = squareform((P - Q) * dist)
        differences = embedded[:, None, :] - embedded[None, :, :]
        grad = np.empty((n_samples, n_components), dtype=params.dtype)
        grad[:] = np.matmul(weights[:, None, :], differences)[:, 0]
        grad = grad.ravel()
        grad *= 2.0 * (dof + 1.0) / dof
        return error, grad

    return gradient


def _squared_distances(points: np.ndarray) -> np.ndarray:
    """`pdist(points, "sqeuclidean")` without its array-API dispatch (most of its time for a few
    dozen points): the compiled function it calls, where this scipy has it."""
    if _compiled_sqeuclidean is None:
        return pdist(points, "sqeuclidean")
    return _compiled_sqeuclidean(points)  # type: ignore[no-any-return]


def _same_as(own: Gradient, count: int, dtype: Any) -> bool:
    """Whether the batched gradient equals scikit-learn's bit for bit on random embeddings of
    `count` points (remembered per process)."""
    key = (count, np.dtype(dtype).name)
    if key not in _checked:
        rng = np.random.default_rng(_PROBE_SEED + count)
        batched = _batched(own)
        same = True
        for scale in (1e-4, 1.0, 30.0):
            params = (rng.normal(size=(count, 2)) * scale).astype(dtype).ravel()
            P = rng.random(count * (count - 1) // 2)
            P /= P.sum()
            for compute_error in (True, False):
                ours = batched(params, P, 1.0, count, 2, compute_error=compute_error)
                theirs = own(params, P, 1.0, count, 2, compute_error=compute_error)
                same = same and ours[1].dtype == theirs[1].dtype and np.array_equal(ours[1], theirs[1]) \
                    and np.array_equal(ours[0], theirs[0], equal_nan=True)
        _checked[key] = same
    return _checked[key]
