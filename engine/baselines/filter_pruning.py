"""L1-norm filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", 2017): the
filter-level baseline GKP is compared against. Filters with the smallest L1 norm are removed
physically, giving a smaller model of plain `nn.Conv2d` / `nn.BatchNorm2d` layers.

CIFAR ResNets prune the first conv of every BasicBlock (the block-internal width), so residual
widths and shortcuts stay as they are; CIFAR VGG-16 prunes every conv and the inputs of the
layer after it. Norms are taken on the original weights of each layer (Li et al.'s
"independent" strategy), and one ratio applies to every pruned layer."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..common.errors import ConfigError
from ..gkp.layers import discover_layers, kept_count
from ..gkp.plan import FilterLayer, PrunePlan, SkippedLayer
from ..gkp.prune_config import PruneConfig
from ..models.metrics import count_cost
from ..models.surgery import filter_chains, remove_filters

# At most this many bisection steps in `match_macs` (2**-40 separates any two ratio boundaries).
_BISECTION_STEPS = 40


@dataclass(frozen=True)
class PrunedLayer:
    """One conv whose filters were pruned: its name in the original model, how many filters it
    had, and the original indices of those kept (ascending)."""

    name: str
    out_channels: int
    kept: tuple[int, ...]


@dataclass
class FilterPruneResult:
    """The smaller model, the per-layer ratio asked for, and what each pruned conv kept."""

    model: nn.Module
    ratio: float
    layers: list[PrunedLayer]

    def kept_indices(self) -> dict[str, list[int]]:
        """Kept filter indices per pruned conv, JSON-ready."""
        return {layer.name: list(layer.kept) for layer in self.layers}


@dataclass
class MacMatch:
    """The outcome of `match_macs`: the pruned model whose MACs come closest to the target."""

    result: FilterPruneResult
    target_macs: int
    achieved_macs: int
    original_macs: int

    @property
    def relative_error(self) -> float:
        """(achieved − target) / target."""
        return (self.achieved_macs - self.target_macs) / self.target_macs


def largest_l1_filters(weight: torch.Tensor, keep: int) -> list[int]:
    """Indices (ascending) of the `keep` filters of a conv weight `(C_out, C_in, k, k)` with the
    largest L1 norm; among equal norms the lower index is kept."""
    norms = weight.detach().abs().flatten(1).sum(dim=1).double()
    order = torch.sort(-norms, stable=True).indices
    return sorted(order[:keep].tolist())


def l1_kept(model: nn.Module, ratio: float) -> list[PrunedLayer]:
    """For every conv filter pruning acts on, the `round((1 - ratio) * C_out)` (at least 1)
    largest-L1 filters of its current weights."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"filter pruning ratio must be in [0, 1), got {ratio!r}")
    layers = []
    for chain in filter_chains(model):
        conv = model.get_submodule(chain.conv)
        keep = largest_l1_filters(conv.weight, kept_count(conv.out_channels, ratio))
        layers.append(PrunedLayer(chain.conv, conv.out_channels, tuple(keep)))
    return layers


def prune_filters(model: nn.Module, ratio: float) -> FilterPruneResult:
    """A new, smaller copy of `model` (left unchanged) with `ratio` of the filters of every pruned
    conv removed, keeping `round((1 - ratio) * C_out)` (at least 1) largest-L1 filters."""
    layers = l1_kept(model, ratio)
    pruned_model = copy.deepcopy(model)
    remove_filters(pruned_model, {layer.name: layer.kept for layer in layers})
    return FilterPruneResult(pruned_model, float(ratio), layers)


def match_macs(model: nn.Module, target_macs: int, input_shape: tuple[int, ...]) -> MacMatch:
    """The uniform filter ratio whose pruned model's MACs (`count_cost` at `input_shape`) come
    closest to `target_macs`, found by bisection (MACs only fall as the ratio grows). A target
    above the original MACs gives ratio 0; one below what one filter per layer costs gives the
    largest ratio. `achieved_macs` says how close it came."""
    filter_chains(model)  # an unsupported architecture fails here, before any work
    if isinstance(target_macs, bool) or not isinstance(target_macs, int) or target_macs <= 0:
        raise ConfigError(f"target MACs must be a positive whole number, got {target_macs!r}")

    def macs(result: FilterPruneResult) -> int:
        return count_cost(result.model, input_shape).macs

    low = prune_filters(model, 0.0)
    low_macs = original = macs(low)
    if target_macs >= low_macs:
        return MacMatch(low, target_macs, low_macs, original)
    # A ratio just below 1: one filter left in every pruned layer.
    high = prune_filters(model, 1.0 - 1e-9)
    high_macs = macs(high)
    if high_macs >= target_macs:
        return MacMatch(high, target_macs, high_macs, original)
    # Invariant: low_macs >= target > high_macs. Stop once the two differ by one filter of one
    # layer: no ratio gives a model in between.
    for _ in range(_BISECTION_STEPS):
        if low_macs == target_macs or _filters_kept(low) - _filters_kept(high) <= 1:
            break
        middle = prune_filters(model, (low.ratio + high.ratio) / 2)
        middle_macs = macs(middle)
        if middle_macs >= target_macs:
            low, low_macs = middle, middle_macs
        else:
            high, high_macs = middle, middle_macs
    if abs(high_macs - target_macs) < abs(low_macs - target_macs):
        return MacMatch(high, target_macs, high_macs, original)
    return MacMatch(low, target_macs, low_macs, original)


def _filters_kept(result: FilterPruneResult) -> int:
    return sum(len(layer.kept) for layer in result.layers)


def gkp_macs(model: nn.Module, config: PruneConfig, input_shape: tuple[int, ...]) -> int:
    """MACs of `model` once GKP at `config`'s rate and groups has pruned it (every eligible conv
    keeps S of C_in grouped kernels): the target L1 filter pruning is matched to."""
    layers = discover_layers(model, groups=config.groups, rate=config.rate, compat=config.compat,  # type: ignore[arg-type]
                             skip_stem=config.skip_stem, include_pointwise=config.include_pointwise,
                             exclude=config.exclude)
    cost = count_cost(model, input_shape)
    removed = sum(cost.layer_macs.get(layer.name, 0) * (1 - layer.kept / layer.in_channels)  # type: ignore[operator]
                  for layer in layers if layer.eligible)
    return round(cost.macs - removed)


def filter_plan(model: nn.Module, config: PruneConfig, input_shape: tuple[int, ...],
                arch: dict[str, Any] | None = None) -> tuple[PrunePlan, MacMatch]:
    """L1-norm filter pruning as a workbench method (`l1-filter`): the uniform filter ratio whose
    model has the MACs GKP would leave at `config.rate`, as a plan of removed filters."""
    target = gkp_macs(model, config, input_shape)
    match = match_macs(model, max(1, target), input_shape)
    params = {
        **config.params(), "method": "l1-filter", "grouping": None, "selection": "l1-norm",
        "filter_ratio": match.result.ratio, "target_macs": match.target_macs,
        "macs_relative_error": match.relative_error,
    }
    chained = {c.conv for c in filter_chains(model)} | {c.reader for c in filter_chains(model)}
    skipped = [SkippedLayer(name, "L1 filter pruning removes the filters of block-internal convs only")
               for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and name not in chained]
    filters = [FilterLayer(layer.name, layer.out_channels, list(layer.kept)) for layer in match.result.layers]
    return PrunePlan("l1-filter", params, [], skipped, arch, filters=filters), match
