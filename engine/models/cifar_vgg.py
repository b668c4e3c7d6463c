"""CIFAR VGG-16, with or without BatchNorm: a `features` Sequential of the standard cfg and
either the common one-layer head `classifier = Linear(512, classes)` ("linear") or the
three-layer head seen in public CIFAR code ("mlp": Dropout, Linear, ReLU, Dropout, Linear,
ReLU, Linear; weights at `classifier.1/4/6`)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from ..common.errors import ArchitectureError

Head = Literal["linear", "mlp"]
HEADS: tuple[str, ...] = ("linear", "mlp")
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)
MLP_HEAD_INDICES: tuple[int, int, int] = (1, 4, 6)


def make_features(in_channels: int, batch_norm: bool) -> nn.Sequential:
    """The VGG-16 conv stack: 3x3 conv (bias), optional BN, ReLU; "M" is a 2x2 max pool."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_CFG:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU(inplace=True))
        channels = int(item)
    return nn.Sequential(*layers)


class CifarVGG16(nn.Module):
    """VGG-16 for 32x32 inputs: the features end at 1x1 spatial size, so the head sees 512
    values."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        batch_norm: bool = True,
        head: Head = "linear",
        hidden: int = 512,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ArchitectureError(f"CIFAR VGG head must be one of {HEADS}, not {head!r}")
        self.features = make_features(in_channels, batch_norm)
        if head == "linear":
            self.classifier: nn.Module = nn.Linear(512, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Dropout(),
                nn.Linear(512, hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))
