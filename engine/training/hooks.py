"""Extension points of the fine-tune loop for methods that train by their own rules: ITP's
masks (an extra step on them after each optimiser step, masks frozen outside the pruning
window) and AdaSAP's adaptive per-filter perturbation. The loop stays one; a method adds rules."""

from __future__ import annotations

from typing import Any

import torch

Steps = list[tuple[torch.Tensor, torch.Tensor]]
"""(parameter, perturbation) pairs of a sharpness-aware step."""


class TrainingHooks:
    """No-op hooks; subclasses override what they need. `stage` names the progress reports.
    `settings()` is stored in `last.pt` and must match on resume; `state_dict()` /
    `load_state_dict()` carry what the hooks accumulate (their trace, for instance) across an
    interruption. `perturbs` says the hooks supply the sharpness pass's perturbation."""

    stage: str = "finetune"
    perturbs: bool = False

    def settings(self) -> dict[str, Any]:
        return {}

    def start_epoch(self, epoch: int) -> None:
        """Before epoch `epoch` (0-based) trains."""

    def perturbation(self) -> Steps | None:
        """The weight perturbation of the sharpness pass, from the gradients now held; None
        skips the pass for this batch."""
        return None

    def after_step(self, step: int, lr: float) -> None:
        """After the optimiser step of global step `step` (1-based over the run) at rate `lr`."""

    def end_epoch(self, record: Any) -> None:
        """After epoch `record.epoch` (1-based) trained and validated, before `last.pt` is
        written, so what this records survives a resume."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
