"""Zeroed-weight pruned layers: a conv whose kernel or weight mask (from in-train pruning) keeps
its pruned weights at zero in every forward pass, so they stay pruned while it trains. Its keep
mask comes from the plan, not the state dict, so a masked checkpoint's weights load into a plain
conv too."""

from __future__ import annotations

import torch
from torch import nn

from .plan import MaskLayer


class ZeroMaskedConv(nn.Conv2d):
    """An `nn.Conv2d` whose forward uses `weight * keep`; the plan's `MaskLayer` says which."""

    def __init__(self, conv: nn.Conv2d, mask: MaskLayer) -> None:
        mask.check_conv(conv)
        super().__init__(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        self.granularity = mask.granularity
        self.register_buffer("keep", mask.weight_keep().to(conv.weight.device, conv.weight.dtype).contiguous(),
                             persistent=False)
        with torch.no_grad():
            self.weight.copy_(conv.weight * self.keep)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def reset_parameters(self) -> None:
        """Zeros: the weights always come from a conv or a state dict, and building the structure
        must not consume the global RNG."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.keep, self.bias)

    def to_dense_conv(self) -> nn.Conv2d:
        """A plain conv holding the masked weights (pruned ones zero)."""
        dense = nn.utils.skip_init(
            nn.Conv2d, self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=self.bias is not None,
            padding_mode=self.padding_mode, device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.weight * self.keep)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        kept = int(self.keep.count_nonzero())
        return f"{self.granularity} mask keeps {kept}/{self.keep.numel()} weights, " + super().extra_repr()
