"""What the workbench's background jobs run: plain functions of `(…, progress, cancel)` on the
engine's pipeline, returning dataclasses the UI adopts when the job is done. They never touch
the UI, and the app imports this module only inside its workers, so torch loads off the main
thread."""

from __future__ import annotations

import copy
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from engine.adasap.phases import PhaseOutcome
from engine.common.errors import WorkbenchError
from engine.common.progress import Progress, ProgressCallback, check_cancel
from engine.config import RunConfig
from engine.gkp.plan import PrunePlan
from engine.gkp.traces import LayerDone, MaskSetup, TraceEvent, read_jsonl, write_jsonl
from engine.pipeline import (
    Evaluation,
    PruneOutcome,
    Workspace,
    evaluate,
    finetune_model,
    measure_sharpness,
    open_workspace,
    prune,
    save_model,
    warmup,
)
from engine.training.finetune import FinetuneResult
from widgets.heatmap import style_table

from .model_scan import inspect_model
from .model_view import ModelInfo

TRACE_SUFFIX = ".decisions.jsonl"
PLAN_SUFFIX = ".plan.json"
BATCH_TRACE = "decisions.jsonl"  # what batch mode writes beside its pruned.pt


@dataclass
class Opened:
    workspace: Workspace
    info: ModelInfo
    events: list[TraceEvent]


@dataclass
class Pruned:
    outcome: PruneOutcome
    events: list[TraceEvent]


@dataclass
class Warmed:
    """AdaSAP's warmup result and its trace (adaptive radii, then the sharpness it left)."""

    phase: PhaseOutcome
    events: list[TraceEvent]


@dataclass
class Finetuned:
    result: FinetuneResult
    model: nn.Module


def open_model(config: RunConfig, progress: ProgressCallback, cancel: threading.Event) -> Opened:
    """Open the workspace for inspection, measure it, and find a trace saved beside a pruned
    checkpoint."""
    config = copy.deepcopy(config)
    # The TUI opens for inspection; a job that needs the normalisation asks for it then.
    config.run.stages = ["prune"]
    progress(Progress("open", 0, 2, "loading checkpoint and data"))
    ws = open_workspace(config)
    check_cancel(cancel)
    progress(Progress("open", 1, 2, "kernel smoothness and MACs"))
    info = inspect_model(ws.model, ws.cost, config.prune.smoothness_power)
    style_table()  # the heatmap's colour styles, built here rather than on its first draw
    plan = ws.plan
    events = saved_trace(ws.checkpoint.path, plan) if plan is not None else []
    progress(Progress("open", 2, 2, "done"))
    return Opened(ws, info, events)


def prune_model(ws: Workspace, model: nn.Module | None, progress: ProgressCallback,
                cancel: threading.Event) -> Pruned:
    """Prune `model` (the warmed-up one in an AdaSAP session, else the opened one) with the
    configured method, and measure its sharpness after when the run measures it."""
    events: list[TraceEvent] = []
    outcome = prune(ws, model=model, on_event=events.append, progress=progress, cancel=cancel)
    if ws.config.measures_sharpness():
        measure_sharpness(ws, outcome.model, "after_prune", cancel=cancel, on_event=events.append)
    check_cancel(cancel)  # a cancel during the final latency timing still discards the result
    return Pruned(outcome, events)


def warmup_model(ws: Workspace, progress: ProgressCallback, cancel: threading.Event) -> Warmed:
    """AdaSAP's warmup of the opened model, then its sharpness before pruning."""
    phase = warmup(ws, None, progress=progress, cancel=cancel)
    events = list(phase.events)
    if ws.config.measures_sharpness():
        measure_sharpness(ws, phase.model, "before_prune", cancel=cancel, on_event=events.append)
    return Warmed(phase, events)


def save_pruned(ws: Workspace, outcome: PruneOutcome, events: list[TraceEvent], path: Path,
                progress: ProgressCallback, cancel: threading.Event) -> list[Path]:
    """Write the pruned model, its plan and its decision trace side by side."""
    save_model(ws, path, outcome.model, outcome.plan, {"stage": "prune", "source": str(ws.checkpoint.path)})
    plan_path, trace_path = path.with_suffix(PLAN_SUFFIX), path.with_suffix(TRACE_SUFFIX)
    outcome.plan.save(plan_path)
    write_jsonl(trace_path, events)
    return [path, plan_path, trace_path]


def finetune_copy(ws: Workspace, base: nn.Module, plan: PrunePlan | None, out_dir: Path | None,
                  progress: ProgressCallback, cancel: threading.Event) -> Finetuned:
    """Fine-tune a copy of `base`, so the model it started from stays as it was."""
    model = copy.deepcopy(base)
    return Finetuned(finetune_model(ws, model, plan, out_dir, progress=progress, cancel=cancel), model)


def evaluate_models(ws: Workspace, models: dict[str, nn.Module], progress: ProgressCallback,
                    cancel: threading.Event) -> dict[str, Evaluation]:
    """The attack suite on a copy of each model in turn (evaluation moves a model to the device
    and switches its mode, which another job may be reading meanwhile); progress messages name
    the model."""

    def labelled(label: str) -> ProgressCallback:
        return lambda p: progress(dataclasses.replace(p, message=f"{label}: {p.stage} {p.message}".strip()))

    return {label: evaluate(ws, copy.deepcopy(model), label=f"{label} model", progress=labelled(label),
                            cancel=cancel)
            for label, model in models.items()}


def saved_trace(checkpoint: Path, plan: PrunePlan) -> list[TraceEvent]:
    """The decision trace saved beside a pruned checkpoint (by the TUI as `X.decisions.jsonl`, by
    batch mode as `decisions.jsonl`) when its results are the checkpoint's plan, else none."""
    planned = {layer.name: layer for layer in plan.layers}
    for candidate in (checkpoint.with_suffix(TRACE_SUFFIX), checkpoint.parent / BATCH_TRACE):
        if not candidate.is_file():
            continue
        try:
            events = read_jsonl(candidate)
        except WorkbenchError:
            continue
        done = {e.layer: e for e in events if isinstance(e, LayerDone)}
        masked = {e.layer for e in events if isinstance(e, MaskSetup)}
        if masked and masked != {layer.name for layer in plan.layers} | {m.name for m in plan.masks}:
            continue
        if done.keys() == planned.keys() and all(
            [list(k) for k in event.kept_channels] == planned[name].kept_channels for name, event in done.items()
        ):
            return events
    return []
