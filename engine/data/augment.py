"""Training augmentation as batched tensor ops: random crop from a zero-padded image plus an
optional horizontal flip. The random draws are made per dataset index for a whole epoch, so an
item's augmentation does not depend on which batch or process it lands in."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropFlipDraws:
    """One epoch's draws per dataset index: crop offsets (row, col) in [0, 2·pad] and flips."""

    offsets: torch.Tensor
    flips: torch.Tensor
    pad: int

    @classmethod
    def draw(cls, n: int, pad: int, flip: bool, generator: torch.Generator) -> "CropFlipDraws":
        offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        flips = torch.rand(n, generator=generator) < 0.5
        return cls(offsets, flips if flip else torch.zeros(n, dtype=torch.bool), pad)

    def to(self, device: torch.device) -> "CropFlipDraws":
        """The same draws on `device`, copied once per epoch rather than once per batch."""
        return CropFlipDraws(self.offsets.to(device), self.flips.to(device), self.pad)

    def apply(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """`images` (B, C, H, W), the batch of dataset items `indices`, cropped and flipped."""
        return crop_flip(images, self.offsets[indices], self.flips[indices], self.pad)


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Crop each image of the batch at `offsets` from its `pad`-zero-padded copy (same size out),
    then mirror left-right those with `flips` set."""
    batch, _, height, width = images.shape
    device = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = offsets.to(device)
    rows = offsets[:, :1] + torch.arange(height, device=device)
    cols = offsets[:, 1:] + torch.arange(width, device=device)
    cols = torch.where(flips.to(device)[:, None], cols.flip(1), cols)
    picked = padded[torch.arange(batch, device=device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return picked.permute(0, 3, 1, 2).contiguous()
