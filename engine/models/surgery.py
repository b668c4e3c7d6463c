"""Filter surgery on the CIFAR models: remove a conv's output filters physically (the conv, its
BatchNorm and the inputs of what reads it shrink), or silence them in place (zero weights and
BN affine terms, so they output exact zeros). L1-norm filter pruning decides which filters;
pruned checkpoints rebuild their structure from the kept indices with the same code.

CIFAR ResNets prune the first conv of every BasicBlock (its outputs feed only the block's
second conv, so residual widths and shortcuts stay); CIFAR VGG-16 prunes every conv of
`features`, read by the next conv or, for the last one, by the classifier's first linear layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..common.errors import ConfigError
from .cifar_resnet import BasicBlock, CifarResNet
from .cifar_vgg import CifarVGG16

# (first conv, its BatchNorm, second conv) of a BasicBlock under each naming of cifar_resnet.
_BLOCK_LAYERS: tuple[tuple[str, str, str], ...] = (("conv1", "bn1", "conv2"), ("conv_a", "bn_a", "conv_b"))
SUPPORTED = "CIFAR ResNets (engine.models.cifar_resnet) and CIFAR VGG-16 (engine.models.cifar_vgg)"


@dataclass(frozen=True)
class FilterChain:
    """A conv whose filters can be removed, the BatchNorm after it (if any) and the module that
    reads its outputs (a conv, or a linear layer for VGG's last conv)."""

    conv: str
    bn: str | None
    reader: str


def filter_chains(model: nn.Module) -> list[FilterChain]:
    """Every conv of `model` that filter pruning acts on, in module order; `ConfigError` for an
    architecture it does not know."""
    if isinstance(model, CifarResNet):
        chains = []
        for name, block in model.named_modules():
            if isinstance(block, BasicBlock):
                conv_a, bn_a, conv_b = next(names for names in _BLOCK_LAYERS if hasattr(block, names[0]))
                chains.append(FilterChain(f"{name}.{conv_a}", f"{name}.{bn_a}", f"{name}.{conv_b}"))
        return chains
    if isinstance(model, CifarVGG16):
        features = model.features
        convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
        head = model.classifier
        last_reader = "classifier" if isinstance(head, nn.Linear) else (
            f"classifier.{next(i for i, m in enumerate(head) if isinstance(m, nn.Linear))}")
        return [
            FilterChain(f"features.{i}", f"features.{i + 1}" if isinstance(features[i + 1], nn.BatchNorm2d) else None,
                        f"features.{convs[p + 1]}" if p + 1 < len(convs) else last_reader)
            for p, i in enumerate(convs)
        ]
    raise ConfigError(f"filter pruning supports {SUPPORTED}, not {type(model).__name__}")


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
    like = bn.weight if bn.affine else bn.running_mean  # the device and dtype to keep, if any
    new = nn.BatchNorm2d(
        len(index), eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats,
        device=None if like is None else like.device, dtype=None if like is None else like.dtype,
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


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _checked(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> list[tuple[FilterChain, list[int]]]:
    """The chains `kept` names, each with its kept filters checked against the model."""
    chains = {chain.conv: chain for chain in filter_chains(model)}
    unknown = sorted(set(kept) - set(chains))
    if unknown:
        raise ConfigError(f"filter pruning cannot act on {unknown[0]!r} of {type(model).__name__}")
    out = []
    for name, indices in kept.items():
        filters = model.get_submodule(name).out_channels
        index = sorted(int(i) for i in indices)
        if not index or len(set(index)) != len(index) or index[0] < 0 or index[-1] >= filters:
            raise ConfigError(f"{name}: kept filters must be distinct indices in 0..{filters - 1}, at least one")
        out.append((chains[name], index))
    return out


def filter_batchnorm_channels(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """For each named conv of `model` with a BatchNorm after it, that BatchNorm's name and the
    channels `remove_filters` keeps of it."""
    if not kept:
        return {}
    return {chain.bn: index for chain, index in _checked(model, kept) if chain.bn is not None}


def silenced_tensors(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> list[torch.Tensor]:
    """The tensors `silence_filters` writes to: each named conv's weight and bias and the affine
    terms of its BatchNorm."""
    tensors: list[torch.Tensor] = []
    for chain, _ in _checked(model, kept) if kept else []:
        modules = [model.get_submodule(chain.conv), *([model.get_submodule(chain.bn)] if chain.bn else [])]
        tensors += [t for m in modules for t in (m.weight, m.bias) if t is not None]
    return tensors


def remove_filters(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> None:
    """In place: keep only the filters `kept[conv]` of each named conv, shrinking the conv, its
    BatchNorm and the inputs of its reader."""
    for chain, index in _checked(model, kept):
        _replace(model, chain.conv, _sub_conv(model.get_submodule(chain.conv), out_index=index))
        if chain.bn is not None:
            _replace(model, chain.bn, _sub_bn(model.get_submodule(chain.bn), index))
        reader = model.get_submodule(chain.reader)
        if isinstance(reader, nn.Linear):
            _replace(model, chain.reader, _sub_linear_inputs(reader, index))
        else:
            _replace(model, chain.reader, _sub_conv(reader, in_index=index))


def silence_filters(model: nn.Module, kept: Mapping[str, Sequence[int]]) -> None:
    """In place: zero every filter of the named convs outside `kept[conv]` (weights, bias and
    the BN scale and shift), so it outputs exact zeros: the function of `remove_filters`' model
    at the original shapes."""
    for chain, index in _checked(model, kept):
        conv = model.get_submodule(chain.conv)
        dropped = sorted(set(range(conv.out_channels)) - set(index))
        with torch.no_grad():
            conv.weight[dropped] = 0.0
            if conv.bias is not None:
                conv.bias[dropped] = 0.0
            if chain.bn is not None:
                bn = model.get_submodule(chain.bn)
                if bn.affine:
                    bn.weight[dropped] = 0.0
                    bn.bias[dropped] = 0.0
