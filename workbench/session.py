"""The workbench's state on the UI side: the opened workspace and what jobs produced from it.
Only the main thread changes it, in response to job messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.gkp.traces import MODEL, TraceEvent

from .model_view import LayerRow, ModelInfo, layer_rows, listed_rows

if TYPE_CHECKING:
    from torch import nn

    from engine.formats.listing import CheckpointIndex
    from engine.gkp.plan import PrunePlan
    from engine.pipeline import Evaluation, PruneOutcome, Workspace
    from engine.training.finetune import EpochRecord, FinetuneResult

UNPRUNED, WARMED, PRUNED_MODEL, FINETUNED = "unpruned", "warmed up", "pruned", "fine-tuned"
PARTIAL, COMPLETE = "partial", "complete"  # how far a model's evaluation got
TRACE_SUFFIX = ".decisions.jsonl"
PLAN_SUFFIX = ".plan.json"


def saved_files(path: Path) -> tuple[Path, Path, Path]:
    """What saving a pruned model to `path` writes: the model, its plan and its decision trace."""
    return path, path.with_suffix(PLAN_SUFFIX), path.with_suffix(TRACE_SUFFIX)


@dataclass
class Session:
    """Opened model (first its layers as listed from the file, then the model, then its data),
    AdaSAP's warmed-up model, pruning outcome with its decision trace, fine-tuning and
    evaluations (each model's marked partial until all of it is done)."""

    listing: "CheckpointIndex | None" = None
    workspace: "Workspace | None" = None
    info: ModelInfo | None = None
    open_error: str | None = None
    data_note: str = ""
    warmed: "nn.Module | None" = None
    warmup_events: list[TraceEvent] = field(default_factory=list)
    outcome: "PruneOutcome | None" = None
    events: list[TraceEvent] = field(default_factory=list)
    finetuned: "nn.Module | None" = None
    finetune_result: "FinetuneResult | None" = None
    loss_curve: list[tuple[float, float]] = field(default_factory=list)
    epochs: list["EpochRecord"] = field(default_factory=list)
    evaluations: dict[str, "Evaluation"] = field(default_factory=dict)
    evaluation_status: dict[str, str] = field(default_factory=dict)

    @property
    def plan(self) -> PrunePlan | None:
        """The plan made in this session, else the one a pruned checkpoint was saved with."""
        if self.outcome is not None:
            return self.outcome.plan
        return None if self.workspace is None else self.workspace.plan

    def rows(self) -> list[LayerRow]:
        """Every conv's row: complete once the model is open, names and shapes while only the
        file has been listed."""
        if self.workspace is None or self.info is None:
            return [] if self.listing is None else listed_rows(self.listing)
        cost_after = None if self.outcome is None else self.outcome.cost_after
        return layer_rows(self.workspace.layers(), self.info, self.plan, cost_after)

    def row(self, name: str) -> LayerRow | None:
        return next((r for r in self.rows() if r.name == name), None)

    def layer_events(self, name: str) -> list[TraceEvent]:
        """The events of one conv, with the model-level ones (sharpness, progressive pruning
        steps) where they happened."""
        return [e for e in self.events if e.layer in (name, MODEL)]

    def models(self) -> dict[str, Any]:
        """The models a job can use, by label: unpruned, pruned, fine-tuned (those that exist)."""
        out: dict[str, Any] = {}
        if self.workspace is not None:
            label = PRUNED_MODEL if self.workspace.checkpoint.plan is not None else UNPRUNED
            out[label] = self.workspace.model
        if self.warmed is not None:
            out[WARMED] = self.warmed
        if self.outcome is not None:
            out[PRUNED_MODEL] = self.outcome.model
        if self.finetuned is not None:
            out[FINETUNED] = self.finetuned
        return out
