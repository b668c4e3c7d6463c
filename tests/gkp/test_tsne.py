"""Exact t-SNE with a batched gradient: the embedding is scikit-learn's bit for bit, the batched
gradient is checked against scikit-learn's before use, and a gradient that differs is never used."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from sklearn.manifold import TSNE, _t_sne

from engine.gkp import tsne


@pytest.mark.parametrize(("count", "features", "seed"), [(8, 9, 0), (16, 36, 1), (33, 18, 2), (64, 72, 3)])
def test_the_embedding_is_scikit_learns_bit_for_bit(count, features, seed):
    points = np.random.default_rng(seed).normal(size=(count, features))
    perplexity = min(count / 4, count - 1)
    own = _t_sne._kl_divergence
    ours = tsne.exact_tsne(points, perplexity, seed)
    assert _t_sne._kl_divergence is own  # scikit-learn's own gradient is back
    theirs = TSNE(n_components=2, perplexity=perplexity, init="pca", method="exact",
                  random_state=seed).fit_transform(points)
    assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="checked on x86-64 BLAS builds")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_batched_gradient_matches_scikit_learns_here(dtype, monkeypatch):
    """On this machine the fast path is taken: its gradient and error equal scikit-learn's."""
    monkeypatch.setattr(tsne, "_checked", {})
    assert all(tsne._same_as(_t_sne._kl_divergence, count, dtype) for count in (3, 8, 16, 37, 64, 128))
    rng = np.random.default_rng(5)
    params = rng.normal(size=40).astype(dtype)
    P = rng.random(190)
    P /= P.sum()
    batched = tsne._batched(_t_sne._kl_divergence)
    for compute_error in (True, False):
        ours = batched(params, P, 1.0, 20, 2, compute_error=compute_error)
        theirs = _t_sne._kl_divergence(params, P, 1.0, 20, 2, compute_error=compute_error)
        assert np.array_equal(ours[1], theirs[1]) and np.array_equal(ours[0], theirs[0], equal_nan=True)


def test_a_gradient_that_differs_is_never_used(monkeypatch):
    """When scikit-learn's gradient is not what the batched one computes (here: one ulp apart),
    the check fails and scikit-learn's own runs, so the embedding stays scikit-learn's."""
    own = _t_sne._kl_divergence
    calls: list[int] = []

    def nudged(*args, **kwargs):
        calls.append(1)
        error, grad = own(*args, **kwargs)
        return error, np.nextafter(grad, np.inf)

    monkeypatch.setattr(tsne, "_checked", {})
    monkeypatch.setattr(_t_sne, "_kl_divergence", nudged)
    points = np.random.default_rng(4).normal(size=(12, 6))
    ours = tsne.exact_tsne(points, 3.0, 0)
    assert tsne._checked == {(12, "float32"): False}
    probes = len(calls)
    theirs = TSNE(n_components=2, perplexity=3.0, init="pca", method="exact", random_state=0).fit_transform(points)
    assert np.array_equal(ours, theirs) and probes > 6  # the nudged gradient ran the whole descent
    assert _t_sne._kl_divergence is nudged


def test_points_kept_fixed_go_to_scikit_learns_gradient():
    """`skip_num_points` (not used by exact fits) is left to scikit-learn's own gradient."""
    seen: list[int] = []

    def own(params, P, dof, n_samples, n_components, skip_num_points=0, compute_error=True):
        seen.append(skip_num_points)
        return 0.0, params

    tsne._batched(own)(np.zeros(8), np.full(6, 1 / 6), 1.0, 4, 2, skip_num_points=2)
    assert seen == [2]
