"""Stage 1 groupings without clustering: the snaking deal (SPEC §3.1) on hand-checkable layers,
magnitude snaking, seeded random groups, and equal sizes on random shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.common.errors import ConfigError
from engine.gkp.grouping import (
    groups_from_labels,
    magnitude_snaking,
    random_grouping,
    smoothness_snaking,
    snake_deal,
)
from engine.gkp.smoothness import kernel_smoothness


def test_snake_deal_by_hand():
    values = np.array([5.0, 1.0, 7.0, 3.0, 2.0, 8.0, 6.0, 4.0])
    deal = snake_deal(values, 2)
    # ascending order: f1(1) f4(2) f3(3) f7(4) f0(5) f6(6) f2(7) f5(8)
    assert deal.order == [1, 4, 3, 7, 0, 6, 2, 5]
    assert deal.group_of_rank == [0, 1, 1, 0, 0, 1, 1, 0]
    assert deal.values == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert deal.filter_groups == [[0, 1, 5, 7], [2, 3, 4, 6]]


def test_snake_deal_four_groups_goes_back_and_forth():
    deal = snake_deal(np.arange(12, dtype=float), 4)
    assert deal.group_of_rank == [0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3]
    assert deal.filter_groups == [[0, 7, 8], [1, 6, 9], [2, 5, 10], [3, 4, 11]]


def test_snake_ties_keep_filter_order():
    deal = snake_deal(np.array([1.0, 0.0, 1.0, 0.0]), 2)
    assert deal.order == [1, 3, 0, 2]
    assert snake_deal(np.array([1.0, 0.0, 1.0, 0.0]), 2, descending=True).order == [0, 2, 1, 3]


def test_smoothness_snaking_uses_filter_smoothness():
    weight = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    weight[0, :, 1, 1] = 3.0  # a spike: rough
    weight[1] = 1.0  # constant: perfectly smooth
    weight[2, 0, 0, 0] = 1.0  # a small corner bump
    weight[3, :, :, 0] = 2.0  # a vertical edge
    heat = kernel_smoothness(weight).numpy()
    deal = smoothness_snaking(heat, 2)
    expected = np.argsort(heat.sum(axis=1), kind="stable").tolist()
    assert deal.order == expected
    assert deal.order[0] == 1 and deal.order[-1] == 0
    assert deal.filter_groups == [sorted([expected[0], expected[3]]), sorted([expected[1], expected[2]])]


def test_magnitude_snaking_signed_sum_descending():
    weight = torch.zeros(4, 1, 1, 1)
    weight[:, 0, 0, 0] = torch.tensor([-1.0, 4.0, 2.0, -3.0])
    deal = magnitude_snaking(weight, 2)
    assert deal.order == [1, 2, 0, 3]  # 4, 2, -1, -3
    assert deal.filter_groups == [[1, 3], [0, 2]]


def test_random_grouping_is_seeded_and_equal():
    a = random_grouping(32, 4, np.random.default_rng(0))
    assert a == random_grouping(32, 4, np.random.default_rng(0))
    assert a != random_grouping(32, 4, np.random.default_rng(1))
    assert sorted(i for g in a for i in g) == list(range(32))
    assert {len(g) for g in a} == {8}
    assert a == sorted(a) and all(g == sorted(g) for g in a)


@pytest.mark.parametrize("seed", range(20))
def test_groups_always_equal_size(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 2, 4, 8]))
    c_out = n * int(rng.integers(1, 9))
    values = rng.normal(size=c_out)
    values[rng.integers(0, c_out, c_out // 2)] = 0.5  # ties
    for groups in (snake_deal(values, n).filter_groups, snake_deal(values, n, descending=True).filter_groups,
                   random_grouping(c_out, n, rng)):
        assert len(groups) == n
        assert {len(g) for g in groups} == {c_out // n}
        assert sorted(i for g in groups for i in g) == list(range(c_out))


def test_indivisible_counts_are_rejected():
    with pytest.raises(ConfigError, match="cannot form 3 equal groups"):
        snake_deal(np.zeros(8), 3)
    with pytest.raises(ConfigError):
        random_grouping(10, 4, np.random.default_rng(0))


def test_groups_from_labels_orders_by_first_filter():
    assert groups_from_labels(np.array([2, 0, 2, 1, 0, 1]), 3) == [[0, 2], [1, 4], [3, 5]]
