"""Stage 1 filter grouping without clustering (SPEC §3.1): smoothness snaking, magnitude
snaking for 1x1 convs, and seeded random groups; every grouping yields n equal-size groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..common.errors import ConfigError

_STABLE = "stable"  # pragma: no mutate (numpy reads the kind case-insensitively: "STABLE" is the same sort)


@dataclass(frozen=True)
class SnakeResult:
    """A snaking deal: `order[r]` is the filter of rank r, `values[r]` its key and
    `group_of_rank[r]` the group it went to; `filter_groups` are the groups, ascending inside."""

    order: list[int]
    values: list[float]
    group_of_rank: list[int]
    filter_groups: list[list[int]]


def check_divisible(out_channels: int, groups: int) -> None:
    """Equal-size groups need `groups` to divide the filter count."""
    if groups < 1 or out_channels % groups:
        raise ConfigError(f"{out_channels} filters cannot form {groups} equal groups")


def snake_deal(values: np.ndarray, groups: int, *, descending: bool = False) -> SnakeResult:
    """Sort filters by `values` (stable: ties keep filter order) and deal them out in an S shape:
    ranks 0..n-1 to groups 0..n-1, ranks n..2n-1 to groups n-1..0, and so on."""
    values = np.asarray(values, dtype=np.float64)
    check_divisible(len(values), groups)
    order = np.argsort(-values if descending else values, kind=_STABLE)
    ranks = np.arange(len(values))
    lap, position = np.divmod(ranks, groups)
    group_of_rank = np.where(lap % 2 == 0, position, groups - 1 - position)
    filter_groups = [sorted(order[group_of_rank == g].tolist()) for g in range(groups)]
    return SnakeResult(order.tolist(), values[order].tolist(), group_of_rank.tolist(), filter_groups)


def smoothness_snaking(heat: np.ndarray, groups: int) -> SnakeResult:
    """SR-GKP grouping: snake the filters by filter smoothness (row sums of the layer's
    `C_out x C_in` kernel-smoothness heatmap), smoothest first."""
    return snake_deal(np.asarray(heat, dtype=np.float64).sum(axis=1), groups)


def filter_signed_sums(weight: torch.Tensor) -> np.ndarray:
    """Signed sum of each filter's weights, the magnitude-snaking key."""
    return np.asarray(weight.detach().cpu(), dtype=np.float64).sum(axis=(1, 2, 3))


def magnitude_snaking(weight: torch.Tensor, groups: int) -> SnakeResult:
    """Grouping for 1x1 convs (no smoothness): snake by signed filter sum, largest first."""
    return snake_deal(filter_signed_sums(weight), groups, descending=True)


def random_grouping(out_channels: int, groups: int, rng: np.random.Generator) -> list[list[int]]:
    """Seeded random partition into equal groups, each ascending, ordered by first filter."""
    check_divisible(out_channels, groups)
    perm = rng.permutation(out_channels).reshape(groups, out_channels // groups)
    return sorted(sorted(row.tolist()) for row in perm)


def groups_from_labels(labels: np.ndarray, groups: int) -> list[list[int]]:
    """Turn per-filter labels 0..n-1 into ascending groups ordered by their first filter."""
    labels = np.asarray(labels)
    return sorted(np.flatnonzero(labels == g).tolist() for g in range(groups))
