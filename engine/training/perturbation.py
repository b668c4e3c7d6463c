"""Per-neuron sharpness-aware perturbations (AdaSAP, SPEC §9): each output neuron (filter) of a
conv or linear weight gets its own radius ρ_i, scaled ASAM-style by T_w = |w| + η. Shared by
AdaSAP's adaptive warmup step and the fine-tune loop's per-filter (`sam_partition = "filter"`)
robustness phase."""

from __future__ import annotations

import torch
from torch import nn

ETA = 0.01  # ASAM's η: T_w = |w| + η, so zero weights are still perturbed


def neuron_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The weights AdaSAP perturbs, by module name: every conv and linear layer's (BatchNorm and
    bias parameters are left alone)."""
    return [(name, m.weight) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.requires_grad]


def neuron_perturbation(
    weight: torch.Tensor, grad: torch.Tensor, rho: torch.Tensor | float, *, adaptive: bool = True, eta: float = ETA
) -> torch.Tensor:
    """ε̂_i = ρ_i · T_w² g_i / ‖T_w g_i‖₂ for each output neuron i (row of `weight`), T_w = |w| + η
    when `adaptive` (ASAM), else 1 (SAM). A neuron with zero gradient is not moved."""
    t = weight.abs() + eta if adaptive else torch.ones_like(weight)
    scaled = t * grad
    norms = torch.linalg.vector_norm(scaled.flatten(1), dim=1)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    radius = torch.as_tensor(rho, dtype=weight.dtype, device=weight.device).expand(weight.shape[0]).reshape(shape)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms)).reshape(shape)
    step = radius * t * scaled / safe
    return torch.where((norms > 0).reshape(shape), step, torch.zeros_like(step))
