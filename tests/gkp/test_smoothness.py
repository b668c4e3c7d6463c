"""Kernel smoothness (SPEC §2) against a direct transcription of the formula."""

import itertools

import numpy as np
import pytest
import torch

from engine.gkp.smoothness import (
    filter_smoothness,
    grouped_kernel_smoothness,
    kernel_smoothness,
)


def naive_smoothness(kernel: np.ndarray, power: int) -> float:
    kh, kw = kernel.shape
    total = 0.0
    for i, j in itertools.product(range(kh), range(kw)):
        for di, dj in itertools.product((-1, 0, 1), repeat=2):
            a, b = i + di, j + dj
            if (di, dj) != (0, 0) and 0 <= a < kh and 0 <= b < kw:
                total += abs(kernel[a, b] ** power - kernel[i, j] ** power)
    return total


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("power", [1, 2])
def test_matches_formula(k: int, power: int) -> None:
    weight = np.random.default_rng(k).normal(size=(4, 3, k, k))
    expected = np.array([[naive_smoothness(weight[o, c], power) for c in range(3)] for o in range(4)])
    np.testing.assert_allclose(kernel_smoothness(weight, power).numpy(), expected, rtol=1e-12)


def test_hand_computed_kernel() -> None:
    # A 3x3 kernel with a single 1 in the centre: 8 neighbours each differ by 1, both directions.
    kernel = torch.zeros(1, 1, 3, 3)
    kernel[0, 0, 1, 1] = 1.0
    assert kernel_smoothness(kernel).item() == pytest.approx(16.0)
    assert kernel_smoothness(-kernel, power=2).item() == pytest.approx(16.0)  # p=2 ignores sign
    assert kernel_smoothness(torch.ones(1, 1, 3, 3)).item() == 0.0


def test_pointwise_kernels_are_perfectly_smooth() -> None:
    assert torch.count_nonzero(kernel_smoothness(torch.randn(5, 4, 1, 1))) == 0


def test_filter_and_grouped_sums() -> None:
    weight = torch.randn(8, 6, 3, 3)
    heat = kernel_smoothness(weight)
    assert torch.allclose(filter_smoothness(weight), heat.sum(dim=1))
    groups = [[0, 5], [1, 2], [3, 4], [6, 7]]
    grouped = grouped_kernel_smoothness(weight, groups)
    assert grouped.shape == (4, 6)
    assert torch.allclose(grouped[0], heat[0] + heat[5])


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="power"):
        kernel_smoothness(torch.randn(2, 2, 3, 3), power=3)
    with pytest.raises(ValueError, match="conv weight"):
        kernel_smoothness(torch.randn(2, 3, 3))
