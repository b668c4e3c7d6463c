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

import torch
from torch import nn

from ..common.errors import ConfigError
from ..gkp.layers import kept_count
from ..models.cifar_resnet import BasicBlock, CifarResNet
from ..models.cifar_vgg import CifarVGG16
from ..models.metrics import count_cost

# (first conv, its BatchNorm, second conv) of a BasicBlock under each naming of engine.models.cifar_resnet.
_BLOCK_LAYERS: tuple[tuple[str, str, str], ...] = (("conv1", "bn1", "conv2"), ("conv_a", "bn_a", "conv_b"))
# At most this many bisection steps in `match_macs` (2**-40 separates any two ratio boundaries).
_BISECTION_STEPS = 40
SUPPORTED = "CIFAR ResNets (engine.models.cifar_resnet) and CIFAR VGG-16 (engine.models.cifar_vgg)"


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


def _sub_conv(conv: nn.Conv2d, out_index: list[int] | None = None, in_index: list[int] | None = None) -> nn.Conv2d:
    """A new `nn.Conv2d` holding only the given output filters and input channels of `conv`."""
    weight = conv.weight.detach()
    if out_index is not None:
        weight = weight[out_index]
    if in_index is not None:
        weight = weight[:, in_index]
    new = nn.Conv2d(
        weight.shape[1], weight.shape[0], conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach() if out_index is None else conv.bias.detach()[out_index])
    return new


def _sub_bn(bn: nn.BatchNorm2d, index: list[int]) -> nn.BatchNorm2d:
    """A new `nn.BatchNorm2d` over the given channels of `bn`, statistics included."""
    new = nn.BatchNorm2d(
        len(index), eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, device=bn.weight.device if bn.affine else None,
    )
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight.detach()[index])
            new.bias.copy_(bn.bias.detach()[index])
        if bn.track_running_stats and bn.running_mean is not None:
            new.running_mean.copy_(bn.running_mean[index])
            new.running_var.copy_(bn.running_var[index])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    return new


def _sub_linear_inputs(linear: nn.Linear, index: list[int]) -> nn.Linear:
    """A new `nn.Linear` reading only the given input features of `linear`."""
    new = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight.detach()[:, index])
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
    return new


def _prune_resnet(model: CifarResNet, ratio: float) -> list[PrunedLayer]:
    """In place: shrink the first conv, its BN and the second conv's inputs of every block."""
    pruned = []
    for block_name, block in model.named_modules():
        if not isinstance(block, BasicBlock):
            continue
        conv_a, bn_a, conv_b = next(names for names in _BLOCK_LAYERS if hasattr(block, names[0]))
        conv = getattr(block, conv_a)
        keep = largest_l1_filters(conv.weight, kept_count(conv.out_channels, ratio))
        setattr(block, conv_a, _sub_conv(conv, out_index=keep))
        setattr(block, bn_a, _sub_bn(getattr(block, bn_a), keep))
        setattr(block, conv_b, _sub_conv(getattr(block, conv_b), in_index=keep))
        pruned.append(PrunedLayer(f"{block_name}.{conv_a}", conv.out_channels, tuple(keep)))
    return pruned


def _prune_vgg(model: CifarVGG16, ratio: float) -> list[PrunedLayer]:
    """In place: shrink every conv of `features`, its BN, and the inputs of the next conv (or of
    the classifier's first linear layer, for the last conv)."""
    features = model.features
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    keeps = {i: largest_l1_filters(features[i].weight, kept_count(features[i].out_channels, ratio)) for i in convs}
    pruned = [PrunedLayer(f"features.{i}", features[i].out_channels, tuple(keeps[i])) for i in convs]
    for position, i in enumerate(convs):
        previous = keeps[convs[position - 1]] if position else None
        features[i] = _sub_conv(features[i], out_index=keeps[i], in_index=previous)
        if isinstance(features[i + 1], nn.BatchNorm2d):
            features[i + 1] = _sub_bn(features[i + 1], keeps[i])
    head = model.classifier
    if isinstance(head, nn.Linear):
        model.classifier = _sub_linear_inputs(head, keeps[convs[-1]])
    else:
        first = next(i for i, m in enumerate(head) if isinstance(m, nn.Linear))
        head[first] = _sub_linear_inputs(head[first], keeps[convs[-1]])
    return pruned


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, (CifarResNet, CifarVGG16)):
        raise ConfigError(f"L1-norm filter pruning supports {SUPPORTED}, not {type(model).__name__}")


def prune_filters(model: nn.Module, ratio: float) -> FilterPruneResult:
    """A new, smaller copy of `model` (left unchanged) with `ratio` of the filters of every pruned
    conv removed, keeping `round((1 - ratio) * C_out)` (at least 1) largest-L1 filters."""
    _check_supported(model)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"filter pruning ratio must be in [0, 1), got {ratio!r}")
    pruned_model = copy.deepcopy(model)
    layers = _prune_resnet(pruned_model, ratio) if isinstance(pruned_model, CifarResNet) else _prune_vgg(pruned_model, ratio)
    return FilterPruneResult(pruned_model, float(ratio), layers)


def match_macs(model: nn.Module, target_macs: int, input_shape: tuple[int, ...]) -> MacMatch:
    """The uniform filter ratio whose pruned model's MACs (`count_cost` at `input_shape`) come
    closest to `target_macs`, found by bisection (MACs only fall as the ratio grows). A target
    above the original MACs gives ratio 0; one below what one filter per layer costs gives the
    largest ratio. `achieved_macs` says how close it came."""
    _check_supported(model)
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
