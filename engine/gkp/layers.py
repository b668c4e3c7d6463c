"""Conv layer discovery (SPEC §1): which layers GKP can prune, how many grouped kernels each
filter group keeps, and why every other layer is skipped."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ..common.errors import ConfigError
from .prune_config import COMPAT_VALUES, Compat, check_rate_and_groups


@dataclass(frozen=True)
class ConvLayer:
    """One `nn.Conv2d` of a model with its GKP eligibility; `kept` is S when eligible."""

    name: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    conv_groups: int
    eligible: bool
    reason: str | None
    kept: int | None

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.conv_groups, *self.kernel_size)

    @property
    def achieved_ratio(self) -> float | None:
        """Fraction of grouped kernels pruned, `1 - S / C_in`, for an eligible layer."""
        return None if self.kept is None else 1.0 - self.kept / self.in_channels


def kept_count(in_channels: int, rate: float, compat: Compat = "paper") -> int:
    """S, the grouped kernels each filter group keeps: `round((1-rate)*C_in)` at least 1, or the
    reference code's `int((1-rate)*(C_in+1))` under `compat="reference"`."""
    if compat == "reference":
        return int((1.0 - rate) * (in_channels + 1))
    if compat != "paper":
        raise ConfigError(f"compat must be one of {COMPAT_VALUES}, got {compat!r}")
    return max(1, math.floor((1.0 - rate) * in_channels + 0.5))


def discover_layers(
    model: nn.Module,
    *,
    groups: int = 8,
    rate: float = 0.4375,
    compat: Compat = "paper",
    skip_stem: bool = True,
    include_pointwise: bool = False,
    exclude: Iterable[str] = (),
) -> list[ConvLayer]:
    """Every `nn.Conv2d` of `model` in module order, each marked eligible or given the reason it
    is skipped. The stem is the first conv in module order; `ConfigError` when `exclude` names a
    layer the model does not have."""
    check_rate_and_groups(rate, groups)
    excluded = set(exclude)
    layers: list[ConvLayer] = []
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for index, (name, conv) in enumerate(convs):
        kh, kw = conv.kernel_size
        c_out, c_in = conv.out_channels, conv.in_channels
        kept = kept_count(c_in, rate, compat)
        reason: str | None = None
        if name in excluded:
            reason = "excluded by config"
        elif index == 0 and skip_stem:
            reason = "stem (the network's first conv)"
        elif conv.groups != 1:
            reason = "depthwise conv" if conv.groups == c_in else f"already grouped (groups={conv.groups})"
        elif kh * kw == 1 and not include_pointwise:
            reason = "pointwise 1x1 conv (include_pointwise = false)"
        elif c_out % groups:
            reason = f"C_out={c_out} not divisible by groups={groups}"
        elif kept < 1:
            reason = f"rate {rate} keeps no grouped kernel of C_in={c_in}"
        elif kept > c_in:
            reason = f"kept count {kept} exceeds C_in={c_in}"
        layers.append(
            ConvLayer(
                name=name,
                out_channels=c_out,
                in_channels=c_in,
                kernel_size=(kh, kw),
                stride=tuple(conv.stride),  # type: ignore[arg-type]
                conv_groups=conv.groups,
                eligible=reason is None,
                reason=reason,
                kept=kept if reason is None else None,
            )
        )
    unknown = sorted(excluded - {layer.name for layer in layers})
    if unknown:
        raise ConfigError(f"prune.exclude names no conv layer of this model: {', '.join(unknown)}")
    return layers
