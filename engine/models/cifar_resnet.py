"""CIFAR ResNets (depth 6n+2, BasicBlocks) in the two state-dict naming conventions found in
public checkpoints, each with its own parameter-free "option A" shortcut, plus option B.

- naming "layer": `conv1`, `bn1`, `layer{1,2,3}.{i}.conv1/bn1/conv2/bn2`, `linear`; option A
  subsamples by stride 2 and pads `planes//4` zero channels on both sides; option B is
  `shortcut.0` (1x1 conv) / `shortcut.1` (BN).
- naming "stage": `conv_1_3x3`, `bn_1`, `stage_{1,2,3}.{i}.conv_a/bn_a/conv_b/bn_b`,
  `classifier`; option A is a stride-2 1x1 average pool with zero channels appended; option B
  is `downsample.0` / `downsample.1`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..common.errors import ArchitectureError

Naming = Literal["layer", "stage"]
Shortcut = Literal["A", "B"]
NAMINGS: tuple[str, ...] = ("layer", "stage")
SHORTCUTS: tuple[str, ...] = ("A", "B")
# Attribute names per naming: stem conv, stem BN, stage prefix, block convs/BNs, shortcut, head.
_NAMES: dict[str, dict[str, str]] = {
    "layer": {"stem": "conv1", "stem_bn": "bn1", "stage": "layer{}", "conv_a": "conv1",
              "bn_a": "bn1", "conv_b": "conv2", "bn_b": "bn2", "shortcut": "shortcut",
              "head": "linear"},
    "stage": {"stem": "conv_1_3x3", "stem_bn": "bn_1", "stage": "stage_{}", "conv_a": "conv_a",
              "bn_a": "bn_a", "conv_b": "conv_b", "bn_b": "bn_b", "shortcut": "downsample",
              "head": "classifier"},
}


MAX_DEPTH = 1202  # the deepest CIFAR ResNet in the literature (He et al. 2016)


def blocks_per_stage(depth: int) -> int:
    """n for a depth 6n+2 network up to MAX_DEPTH; raises `ArchitectureError` for any other depth."""
    if not isinstance(depth, int) or isinstance(depth, bool) or not 8 <= depth <= MAX_DEPTH or (depth - 2) % 6:
        raise ArchitectureError(
            f"a CIFAR ResNet has depth 6n+2 up to {MAX_DEPTH} (20, 32, 44, 56, 110, ...), not {depth!r}"
        )
    return (depth - 2) // 6


class SubsamplePadShortcut(nn.Module):
    """Option A of the "layer" naming: `x[:, :, ::2, ::2]` with `pad` zero channels added on
    each side of the channel dimension."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class AvgPoolAppendShortcut(nn.Module):
    """Option A of the "stage" naming: a 1x1 average pool with stride 2, then `extra` zero
    channels appended after the existing ones."""

    def __init__(self, extra: int) -> None:
        super().__init__()
        self.extra = extra
        self.pool = nn.AvgPool2d(kernel_size=1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(self.pool(x), (0, 0, 0, 0, 0, self.extra))


def _make_shortcut(naming: str, shortcut: str, in_planes: int, planes: int, stride: int) -> nn.Module | None:
    """The block's shortcut where the shape changes, or None for the identity."""
    if stride == 1 and in_planes == planes:
        return None
    if shortcut == "B":
        return nn.Sequential(
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    if stride != 2 or planes - in_planes < 0 or (naming == "layer" and planes - in_planes != 2 * (planes // 4)):
        raise ArchitectureError(
            f"an option A shortcut cannot map {in_planes} to {planes} channels at stride {stride}"
        )
    if naming == "layer":
        return SubsamplePadShortcut(planes // 4)
    return AvgPoolAppendShortcut(planes - in_planes)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection; attribute names follow `naming`."""

    def __init__(self, naming: str, shortcut: str, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        names = _NAMES[naming]
        self._names = names
        setattr(self, names["conv_a"], nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False))
        setattr(self, names["bn_a"], nn.BatchNorm2d(planes))
        setattr(self, names["conv_b"], nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False))
        setattr(self, names["bn_b"], nn.BatchNorm2d(planes))
        # The "layer" reference code keeps an empty Sequential as the identity; both are key-free.
        module = _make_shortcut(naming, shortcut, in_planes, planes, stride)
        setattr(self, names["shortcut"], module if module is not None else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        get = lambda key: getattr(self, self._names[key])  # noqa: E731
        out = F.relu(get("bn_a")(get("conv_a")(x)))
        out = get("bn_b")(get("conv_b")(out))
        return F.relu(out + get("shortcut")(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet: 3x3 stem, three stages of n BasicBlocks (widths w, 2w, 4w; strides 1, 2, 2),
    global average pool and a linear head."""

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_channels: int = 3,
        naming: Naming = "layer",
        shortcut: Shortcut = "A",
        width: int = 16,
    ) -> None:
        super().__init__()
        if naming not in NAMINGS:
            raise ArchitectureError(f"CIFAR ResNet naming must be one of {NAMINGS}, not {naming!r}")
        if shortcut not in SHORTCUTS:
            raise ArchitectureError(f"CIFAR ResNet shortcut must be one of {SHORTCUTS}, not {shortcut!r}")
        if width < 4 or width % 4:
            raise ArchitectureError(f"CIFAR ResNet base width must be a positive multiple of 4, not {width!r}")
        n = blocks_per_stage(depth)
        names = _NAMES[naming]
        self._names = names
        setattr(self, names["stem"], nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False))
        setattr(self, names["stem_bn"], nn.BatchNorm2d(width))
        in_planes = width
        self._stages: list[str] = []
        for index, (planes, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(naming, shortcut, in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stage_name = names["stage"].format(index)
            setattr(self, stage_name, nn.Sequential(*blocks))
            self._stages.append(stage_name)
        setattr(self, names["head"], nn.Linear(in_planes, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = self._names
        out = F.relu(getattr(self, names["stem_bn"])(getattr(self, names["stem"])(x)))
        for stage in self._stages:
            out = getattr(self, stage)(out)
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return getattr(self, names["head"])(out)
