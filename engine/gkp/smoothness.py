"""Kernel smoothness (SR-GKP Eq. 1), vectorised over whole layers: lower means smoother."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Each unordered neighbour pair (8-neighbourhood) once; the formula counts both directions.
_OFFSETS: tuple[tuple[int, int], ...] = ((0, 1), (1, 0), (1, 1), (1, -1))


def _as_tensor(weight: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.as_tensor(weight)
    if tensor.dim() != 4:
        raise ValueError(f"expected a conv weight (C_out, C_in, k, k), got shape {tuple(tensor.shape)}")
    return tensor.detach().to(torch.float64)


def kernel_smoothness(weight: torch.Tensor | np.ndarray, power: float = 2.0) -> torch.Tensor:
    """`C_out x C_in` matrix of `sum_cell sum_nbr |w[nbr]^p - w[cell]^p|` (no padding, both
    directions counted). Returned as float64 on the CPU."""
    if power not in (1, 2):  # 1.0 and 2.0 compare equal
        raise ValueError(f"smoothness power must be 1 or 2, got {power}")
    wp = _as_tensor(weight).cpu() ** int(power)
    c_out, c_in, kh, kw = wp.shape
    total = torch.zeros((c_out, c_in), dtype=torch.float64)
    for dy, dx in _OFFSETS:
        # Every pair (cell, cell + (dy, dx)) inside the kernel: a `rows x cols` window and its
        # shifted copy, empty when the kernel is too small for the offset.
        rows, cols, left = kh - dy, kw - abs(dx), max(0, -dx)
        a = wp[:, :, :rows, left : left + cols]
        b = wp[:, :, dy:, left + dx : left + dx + cols]
        total += (a - b).abs().sum(dim=(2, 3))
    return 2.0 * total


def filter_smoothness(weight: torch.Tensor | np.ndarray, power: float = 2.0) -> torch.Tensor:
    """Smoothness of each filter: the sum over its `C_in` kernels, shape `(C_out,)`."""
    return kernel_smoothness(weight, power).sum(dim=1)


def grouped_kernel_smoothness(
    weight: torch.Tensor | np.ndarray,
    filter_groups: Sequence[Sequence[int]],
    power: float = 2.0,
) -> torch.Tensor:
    """Smoothness of every grouped kernel, shape `(n_groups, C_in)`: for group `g` and input
    channel `c`, the sum of kernel smoothness over the group's filters."""
    heat = kernel_smoothness(weight, power)
    return torch.stack([heat[list(group)].sum(dim=0) for group in filter_groups])
