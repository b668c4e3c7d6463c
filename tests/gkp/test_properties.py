"""Property-based checks (hypothesis) of the pure algorithm parts over many small random inputs:
smoothness invariants, balanced snaking, selections that keep exactly the target per group, and
the grouped model equal to the masked one on random small architectures and random plans.
Derandomised with modest example counts, so every run tries the same cases in a few seconds."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reconstruct import random_plan, randomize_bn
from torch import nn

from engine.gkp.grouping import filter_signed_sums, magnitude_snaking, smoothness_snaking, snake_deal
from engine.gkp.reconstruct import apply_plan, equivalence_error, masked_dense
from engine.gkp.selection import greedy_select, grouped_kernels, kernel_distances, smooth_beam_select
from engine.gkp.smoothness import filter_smoothness, grouped_kernel_smoothness, kernel_smoothness

FAST = settings(derandomize=True, max_examples=40, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def weights(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@FAST
@given(seed=seeds, out=st.integers(1, 4), inp=st.integers(1, 4), k=st.sampled_from([1, 2, 3, 5]),
       power=st.sampled_from([1, 2]), scale=st.floats(0.1, 10))
def test_smoothness_invariants(seed: int, out: int, inp: int, k: int, power: int, scale: float) -> None:
    w = weights(seed, (out, inp, k, k))
    heat = kernel_smoothness(w, power)
    assert heat.shape == (out, inp) and heat.dtype == torch.float64 and bool((heat >= 0).all())
    assert torch.equal(filter_smoothness(w, power), heat.sum(dim=1))
    groups = [[f] for f in range(out)][::-1]
    assert torch.equal(grouped_kernel_smoothness(w, groups, power), heat.flip(0))
    single = kernel_smoothness(w.float(), power)  # float32 weights are measured in float64
    assert single.dtype == torch.float64 and torch.equal(single, kernel_smoothness(w.float().double(), power))
    for same in (w.flip(-1), w.flip(-2), w.transpose(-1, -2)):  # mirror images and the transpose
        assert torch.allclose(kernel_smoothness(same, power), heat, rtol=1e-9, atol=1e-12)
    assert torch.allclose(kernel_smoothness(scale * w, power), scale**power * heat, rtol=1e-9, atol=1e-12)
    if power == 2:
        assert torch.allclose(kernel_smoothness(-w, power), heat)  # squares ignore the sign
    else:
        assert torch.allclose(kernel_smoothness(w + 3.0, power), heat, atol=1e-9)  # differences ignore offsets
    assert bool((kernel_smoothness(torch.full_like(w, 0.7), power) == 0).all())
    if k == 1:
        assert bool((heat == 0).all())


@FAST
@given(seed=seeds, groups=st.integers(1, 6), size=st.integers(1, 6), ties=st.booleans(),
       descending=st.booleans())
def test_snaking_deals_equal_groups_each_filter_once(seed: int, groups: int, size: int, ties: bool,
                                                     descending: bool) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 3, groups * size).astype(float) if ties else rng.random(groups * size)
    result = snake_deal(values, groups, descending=descending)
    assert [len(g) for g in result.filter_groups] == [size] * groups
    assert sorted(f for g in result.filter_groups for f in g) == list(range(groups * size))
    assert all(g == sorted(g) for g in result.filter_groups)
    ranked = values[result.order]
    assert list(ranked) == sorted(values, reverse=descending)  # ranks follow the key, ties in filter order
    for lap in range(size):  # every lap hands each group exactly one filter, the S shape alternating
        dealt = result.group_of_rank[lap * groups:(lap + 1) * groups]
        assert dealt == (list(range(groups)) if lap % 2 == 0 else list(range(groups))[::-1])
    heat = rng.random((groups * size, 3))
    assert smoothness_snaking(heat, groups).filter_groups == snake_deal(heat.sum(axis=1), groups).filter_groups


@settings(derandomize=True, max_examples=25, deadline=None)
@given(seed=seeds, channels=st.integers(2, 12), data=st.data())
def test_every_selection_keeps_exactly_the_target(seed: int, channels: int, data: st.DataObject) -> None:
    kept = data.draw(st.integers(1, channels), label="kept")
    w = weights(seed, (4, channels, 3, 3))
    d = kernel_distances(grouped_kernels(w, list(range(4))))
    smooth = kernel_smoothness(w).sum(dim=0).numpy()
    for choice in (smooth_beam_select(d, smooth, kept), greedy_select(d, kept),
                   smooth_beam_select(d, smooth, kept, beam_width=3, freeze_beta=True)):
        assert len(choice.kept) == kept and choice.kept == sorted(set(choice.kept))
        assert all(0 <= c < channels for c in choice.kept)


class RandomNet(nn.Module):
    """Convs of random widths and kernel sizes with BatchNorm, a residual add where shapes allow."""

    def __init__(self, widths: list[int], kernels: list[int], residual: bool) -> None:
        super().__init__()
        chans = [3, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, padding=k // 2, bias=False)
                                   for a, b, k in zip(chans, chans[1:], kernels))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in widths)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = torch.relu(bn(conv(x)))
            x = x + y if self.residual and i and y.shape == x.shape else y
        return x


@settings(derandomize=True, max_examples=20, deadline=None)
@given(seed=seeds, groups=st.sampled_from([1, 2, 4]), depth=st.integers(2, 4), data=st.data(),
       rate=st.sampled_from([0.25, 0.4375, 0.5, 0.75]), pointwise=st.booleans(), residual=st.booleans())
def test_grouped_equals_masked_on_random_nets_and_plans(seed: int, groups: int, depth: int, data: st.DataObject,
                                                        rate: float, pointwise: bool, residual: bool) -> None:
    widths = data.draw(st.lists(st.sampled_from([4, 8, 12]), min_size=depth, max_size=depth), label="widths")
    kernels = data.draw(st.lists(st.sampled_from([1, 3, 5]), min_size=depth, max_size=depth), label="kernels")
    torch.manual_seed(seed % 2**31)
    model = randomize_bn(RandomNet(widths, kernels, residual), seed=seed % 1000)
    plan = random_plan(model, groups=groups, rate=rate, seed=seed, include_pointwise=pointwise)
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(seed % 1000))
    for form in ("grouped", "dense"):
        assert equivalence_error(apply_plan(model, plan, form=form), masked_dense(model, plan), x) < 1e-4


def test_snaking_ranks_in_float64_and_keeps_ties_in_filter_order() -> None:
    # Ties in a long key (where numpy's default sort is not stable) keep filter order.
    values = np.random.default_rng(0).integers(0, 2, 256)
    order = snake_deal(values, 4).order
    assert order == sorted(range(256), key=lambda f: (values[f], f))
    # Unsigned keys rank largest first without wrapping round, and ranks carry float keys.
    result = snake_deal(np.array([0, 3, 1, 2], dtype=np.uint8), 2, descending=True)
    assert result.order == [1, 3, 2, 0] and result.values == [3.0, 2.0, 1.0, 0.0]
    # Row sums in float64: a float32 heatmap whose rows tie only when summed exactly.
    heat = np.array([[2.0**24 + 2, 0, 0], [2.0**24, 1, 1]], dtype=np.float32)
    assert smoothness_snaking(heat, 2).filter_groups == [[0], [1]]


def test_magnitude_key_is_each_filters_signed_sum_in_float64() -> None:
    weight = torch.tensor([[[[2.0**24]], [[1.0]], [[1.0]]], [[[-1.0]], [[0.5]], [[0.25]]]], dtype=torch.float32)
    sums = filter_signed_sums(weight)
    assert sums.dtype == np.float64 and sums.tolist() == [2.0**24 + 2, -0.25]
    assert magnitude_snaking(weight, 2).filter_groups == [[0], [1]]
