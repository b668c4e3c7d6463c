"""The layer that applies an input normalisation, so attacks and training see [0, 1] pixels."""

from __future__ import annotations

import torch
from torch import nn

from .normalization import Normalization


class Normalize(nn.Module):
    """First op of an attackable model: maps [0, 1] pixels to the network's input space."""

    def __init__(self, norm: Normalization) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(norm.std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def with_normalization(model: nn.Module, norm: Normalization) -> nn.Sequential:
    """Wrap `model` so it takes [0, 1] pixels; the wrapper shares the model's parameters."""
    return nn.Sequential(Normalize(norm), model)
