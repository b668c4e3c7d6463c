"""AdaSAP's first two phases (SPEC §9, Algorithm 2) as fine-tune-loop runs: the warmup (adaptive
steps only) and progressive pruning (adaptive steps while the chosen method re-plans on an
exponential schedule and the weights its plan drops stay zero). Both use the fine-tune table's
optimiser at a constant learning rate (SPEC §7's CIFAR settings, not the paper's ImageNet
recipe) and resume from `last.pt`."""

from __future__ import annotations

import copy
import dataclasses
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..common.distributed import DistContext
from ..common.errors import Cancelled
from ..common.progress import ProgressCallback
from ..data.datasets import DataBundle
from ..gkp.plan import PrunePlan
from ..gkp.reconstruct import masked_dense
from ..gkp.traces import ProgressivePrune, TraceEvent
from ..models.normalization import Normalization
from ..training.finetune import FinetuneResult, finetune
from ..training.finetune_config import FinetuneConfig
from .adaptive import AdaptiveHooks
from .adasap_config import WarmupConfig

Replan = Callable[[nn.Module, float, bool], tuple[PrunePlan, list[TraceEvent]]]
"""`(model, rate, final)` → the chosen method's plan of the model's current weights at `rate`,
with its decision events (wanted for the final step only)."""


def phase_config(finetune_config: FinetuneConfig, epochs: int) -> FinetuneConfig:
    """An AdaSAP phase's training settings: the fine-tune table's optimiser over `epochs` at a
    constant learning rate; the hooks add the adaptive sharpness pass."""
    return dataclasses.replace(finetune_config, epochs=epochs, milestones=[], mode="standard", sam_rho=None)


def steps_per_epoch(data: DataBundle, batch_size: int) -> int:
    return math.ceil(len(data.train) / batch_size)  # type: ignore[arg-type]


def scheduled_rate(rate: float, step: int, steps: int) -> float:
    """The rate of step `step` of `steps` on AdaSAP's exponential schedule: the kept count
    `k_r = exp(α_r log k + (1 − α_r) log m)`, α_r = r/R, so `1 − (1 − rate)^(r/R)`."""
    return 1.0 - (1.0 - rate) ** (step / steps)


def keep_masks(model: nn.Module, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """0/1 masks of the parameters `plan` zeroes in `model` (by parameter name), read off the
    plan's masked-dense form of an all-ones copy."""
    ones = copy.deepcopy(model)
    with torch.no_grad():
        for p in ones.parameters():
            p.fill_(1.0)
    masked = dict(masked_dense(ones, plan).named_parameters())
    return {name: p.detach().clone() for name, p in masked.items() if not bool((p == 1).all())}


@dataclass
class PhaseOutcome:
    """A phase's trained model, its training record and trace, and (pruning) the final plan."""

    model: nn.Module
    training: FinetuneResult
    events: list[TraceEvent]
    plan: PrunePlan | None = None


class ProgressiveHooks(AdaptiveHooks):
    """Adaptive steps plus AdaSAP's progressive pruning: at `steps` evenly spaced iterations the
    method re-plans at the scheduled rate; what the latest plan drops is zeroed after every
    optimiser step."""

    stage = "prune"

    def __init__(self, model: nn.Module, config: WarmupConfig, replan: Replan, rate: float, iterations: int,
                 method: str) -> None:
        super().__init__(model, config, phase="pruning")
        self.replan, self.rate, self.method = replan, rate, method
        self.steps = max(1, iterations // config.prune_frequency)
        self.schedule = {max(1, round(r * iterations / self.steps)): r for r in range(1, self.steps + 1)}
        self.plan: PrunePlan | None = None
        self.keeps: dict[str, torch.Tensor] = {}
        self.plan_events: list[dict[str, Any]] = []

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "rate": self.rate, "steps": self.steps, "method": self.method,
                "schedule": sorted(self.schedule)}

    def after_step(self, step: int, lr: float) -> None:
        r = self.schedule.get(step)
        if r is not None:
            rate = scheduled_rate(self.rate, r, self.steps)
            self.plan, events = self.replan(self.model, rate, r == self.steps)
            self.keeps = keep_masks(self.model, self.plan)
            zeroed = sum(int((keep == 0).sum()) for keep in self.keeps.values())
            self.events.append(ProgressivePrune("", r, self.steps, step, self.method, rate, zeroed).to_dict())
            if r == self.steps:
                self.plan_events = [e.to_dict() for e in events]
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, keep in self.keeps.items():
                params[name].mul_(keep.to(params[name].device))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "plan": None if self.plan is None else self.plan.to_dict(),
                "plan_events": list(self.plan_events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.plan = None if state["plan"] is None else PrunePlan.from_dict(state["plan"])
        self.keeps = {} if self.plan is None else keep_masks(self.model, self.plan)
        self.plan_events = list(state["plan_events"])


def _run(model: nn.Module, hooks: AdaptiveHooks, data: DataBundle, normalization: Normalization,
         config: FinetuneConfig, out_dir: Path | None, resume: bool, progress: ProgressCallback | None,
         cancel: threading.Event | None, ctx: DistContext | None) -> FinetuneResult:
    training = finetune(model, data, normalization, config, out_dir, resume=resume, progress=progress,
                        cancel=cancel, ctx=ctx, hooks=hooks)
    if not training.completed:
        raise Cancelled(f"AdaSAP {hooks.phase} interrupted")
    return training


def run_warmup(model: nn.Module, data: DataBundle, normalization: Normalization, warmup: WarmupConfig,
               finetune_config: FinetuneConfig, out_dir: Path | None, *, resume: bool = False,
               progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
               ctx: DistContext | None = None) -> PhaseOutcome:
    """AdaSAP phase 1 on a copy of `model`: `warmup.epochs` of adaptive steps."""
    warmup.validate()
    work = copy.deepcopy(model)
    hooks = AdaptiveHooks(work, warmup)
    training = _run(work, hooks, data, normalization, phase_config(finetune_config, warmup.epochs), out_dir,
                    resume, progress, cancel, ctx)
    return PhaseOutcome(work, training, [TraceEvent.from_dict(e) for e in hooks.events])


def run_progressive(model: nn.Module, data: DataBundle, normalization: Normalization, warmup: WarmupConfig,
                    finetune_config: FinetuneConfig, rate: float, method: str, replan: Replan,
                    out_dir: Path | None, *, resume: bool = False, progress: ProgressCallback | None = None,
                    cancel: threading.Event | None = None, ctx: DistContext | None = None) -> PhaseOutcome:
    """AdaSAP phase 2 on a copy of `model`: `warmup.pruning_epochs` of adaptive steps with
    progressive pruning toward `rate`; the result's plan is the last step's, and the model's
    weights it drops are zero."""
    warmup.validate()
    work = copy.deepcopy(model)
    config = phase_config(finetune_config, warmup.pruning_epochs)
    iterations = warmup.pruning_epochs * steps_per_epoch(data, config.batch_size)
    hooks = ProgressiveHooks(work, warmup, replan, rate, iterations, method)
    training = _run(work, hooks, data, normalization, config, out_dir, resume, progress, cancel, ctx)
    assert hooks.plan is not None  # the schedule's last step is the run's last iteration
    events = [TraceEvent.from_dict(e) for e in hooks.plan_events + hooks.events]
    return PhaseOutcome(work, training, events, hooks.plan)
