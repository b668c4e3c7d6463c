"""Trainable pruning masks (SPEC §8, ITP Eq. 2 and 5): every masked conv carries a continuous
mask `M` at one granularity, `M_norm = 0.5·tanh(M) + 0.5`, the binary `M_b = round(M_norm)`,
and computes with `W ⊙ M_b`; gradients reach `M` through a straight-through estimator (the
round is skipped in the backward pass). Outside the mask-learning window the layer uses the
stored `binary` mask and `M` gets no gradient."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

GRANULARITY_SHAPES = {
    "weight": lambda out, inp, kh, kw, n: (out, inp, kh, kw),
    "kernel": lambda out, inp, kh, kw, n: (out, inp),
    "channel": lambda out, inp, kh, kw, n: (inp,),
    "grouped-kernel": lambda out, inp, kh, kw, n: (n, inp),
}


def normalized(mask: torch.Tensor) -> torch.Tensor:
    """M_norm = 0.5·tanh(M) + 0.5, in (0, 1)."""
    return 0.5 * torch.tanh(mask) + 0.5


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """M_b = round(M_norm) (ties to even, so M = 0 is off)."""
    return torch.round(normalized(mask))


def straight_through(mask: torch.Tensor) -> torch.Tensor:
    """M_b in the forward pass, with the gradient of M_norm in the backward pass (ITP Eq. 5)."""
    soft = normalized(mask)
    return soft + (torch.round(soft) - soft).detach()


class MaskedConv(nn.Conv2d):
    """A conv computing with `W ⊙ M_b` at one granularity: `mask` (M) is a parameter starting at 1
    (M_b = 1), `binary` the mask in use when not learning; grouped-kernel masks are `(n, C_in)`
    with `group_of[o]` the filter group of output `o`."""

    def __init__(self, conv: nn.Conv2d, granularity: str, filter_groups: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        self.weight = conv.weight
        self.bias = conv.bias
        self.granularity = granularity
        n = len(filter_groups) if filter_groups is not None else 1
        shape = GRANULARITY_SHAPES[granularity](conv.out_channels, conv.in_channels, *conv.kernel_size, n)
        device, dtype = conv.weight.device, conv.weight.dtype
        self.mask = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        self.register_buffer("binary", torch.ones(shape, device=device, dtype=dtype))
        group_of = torch.zeros(conv.out_channels, dtype=torch.long, device=device)
        for g, filters in enumerate(filter_groups or [range(conv.out_channels)]):
            group_of[list(filters)] = g
        self.register_buffer("group_of", group_of)
        self.learning = False

    def reset_parameters(self) -> None:
        """Nothing: the weight and bias are the wrapped conv's own."""

    def current(self) -> torch.Tensor:
        """M_b, differentiable in M (straight through) while learning with gradients on."""
        if self.learning and torch.is_grad_enabled():
            return straight_through(self.mask)
        return self.binary

    def expand(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask of this granularity broadcast against the weight `(C_out, C_in, kh, kw)`."""
        if self.granularity == "weight":
            return mask
        if self.granularity == "kernel":
            return mask[:, :, None, None]
        if self.granularity == "channel":
            return mask[None, :, None, None]
        return mask[self.group_of][:, :, None, None]

    def refresh(self) -> None:
        """Re-round the binary mask from M (after M changed)."""
        with torch.no_grad():
            self.binary.copy_(binarize(self.mask))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.expand(self.current()), self.bias)

    def to_conv(self) -> nn.Conv2d:
        """A plain conv sharing this layer's weight and bias (the masks dropped)."""
        conv = nn.utils.skip_init(
            nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
            padding_mode=self.padding_mode, device=self.weight.device, dtype=self.weight.dtype,
        )
        conv.weight = self.weight
        conv.bias = self.bias
        return conv


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def install_masks(model: nn.Module, names: Sequence[str], granularity: str,
                  filter_groups: dict[str, list[list[int]]] | None = None) -> dict[str, MaskedConv]:
    """In place: wrap each named conv in a `MaskedConv` (sharing its weight); returns them by name."""
    layers = {}
    for name in names:
        groups = None if filter_groups is None else filter_groups.get(name)
        layers[name] = MaskedConv(model.get_submodule(name), granularity, groups)
        _replace(model, name, layers[name])
    return layers


def remove_masks(model: nn.Module) -> None:
    """In place: every `MaskedConv` back to a plain conv with its (trained) weights."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MaskedConv):
            _replace(model, name, module.to_conv())
