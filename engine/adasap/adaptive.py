"""AdaSAP's adaptive weight perturbation (SPEC §9, `train_iter` of Algorithm 2): per conv and
linear layer, each filter's radius ρ_i falls linearly with its importance from ρ_max (least
important) to ρ_min (most important), min and max taken per layer at every step; the
perturbation is ASAM-scaled per filter. As fine-tune-loop hooks it records, per layer and
epoch, the radii it used (`rho_epoch` trace events)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..gkp.traces import RhoEpoch
from ..training.hooks import Steps, TrainingHooks
from ..training.perturbation import neuron_perturbation, neuron_weights
from .adasap_config import WarmupConfig


def filter_importance(weight: torch.Tensor, grad: torch.Tensor, kind: str) -> torch.Tensor:
    """Importance of each output filter: its ℓ2 norm (`l2`), or the first-order Taylor estimate
    of the loss change on removing it, `(Σ w·g)²` (`taylor`, Molchanov et al. 2019)."""
    if kind == "taylor":
        return (weight * grad).flatten(1).sum(dim=1) ** 2
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


def adaptive_rho(importance: torch.Tensor, rho_min: float, rho_max: float) -> torch.Tensor:
    """ρ_i = ρ_max − (s_i − s_min)/(s_max − s_min)·(ρ_max − ρ_min) (AdaSAP Eq. 2); a layer whose
    filters are all equally important puts every filter at ρ_max."""
    low, high = importance.min(), importance.max()
    if float(high - low) <= 0.0:
        return torch.full_like(importance, rho_max)
    return rho_max - (importance - low) / (high - low) * (rho_max - rho_min)


class _LayerStats:
    """Radii one layer got over the steps of an epoch."""

    def __init__(self, filters: int) -> None:
        self.steps = 0
        self.low, self.high = float("inf"), float("-inf")
        self.total = torch.zeros(filters, dtype=torch.float64)
        self.last = torch.zeros(filters, dtype=torch.float64)
        self.importance = torch.zeros(filters, dtype=torch.float64)

    def add(self, rho: torch.Tensor, importance: torch.Tensor) -> None:
        rho64 = rho.detach().double().cpu()
        self.steps += 1
        self.low, self.high = min(self.low, float(rho64.min())), max(self.high, float(rho64.max()))
        self.total += rho64
        self.last, self.importance = rho64, importance.detach().double().cpu()


class AdaptiveHooks(TrainingHooks):
    """The adaptive step as fine-tune-loop hooks; `phase` names it in traces (`warmup`, or
    `pruning` for AdaSAP's progressive pruning)."""

    stage = "warmup"
    perturbs = True

    def __init__(self, model: nn.Module, config: WarmupConfig, phase: str = "warmup") -> None:
        self.model, self.config, self.phase = model, config, phase
        self.events: list[dict[str, Any]] = []
        self.stats: dict[str, _LayerStats] = {}

    def settings(self) -> dict[str, Any]:
        c = self.config
        return {"phase": self.phase, "rho_min": c.rho_min, "rho_max": c.rho_max, "importance": c.importance}

    def perturbation(self) -> Steps | None:
        steps = []
        for name, weight in neuron_weights(self.model):
            if weight.grad is None:
                continue
            importance = filter_importance(weight, weight.grad, self.config.importance)
            rho = adaptive_rho(importance, self.config.rho_min, self.config.rho_max)
            self.stats.setdefault(name, _LayerStats(weight.shape[0])).add(rho, importance)
            steps.append((weight, neuron_perturbation(weight, weight.grad, rho)))
        return steps

    def end_epoch(self, record: Any) -> None:
        for name, stats in self.stats.items():
            if not stats.steps:
                continue
            self.events.append(RhoEpoch(
                name, self.phase, record.epoch, stats.steps, stats.low, stats.high,
                tuple((stats.total / stats.steps).tolist()), tuple(stats.last.tolist()),
                tuple(stats.importance.tolist()), int(torch.argmin(stats.importance)),
            ).to_dict())
        self.stats = {}

    def state_dict(self) -> dict[str, Any]:
        return {"events": list(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
