"""What the workbench's background jobs run: plain functions of `(…, progress, cancel)` on the
engine's pipeline, returning dataclasses the UI adopts when the job is done. They never touch
the UI, and the app imports this module only inside its workers, so torch loads off the main
thread."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from engine.adasap.phases import PhaseOutcome
from engine.common.errors import ConfigError, DataError, WorkbenchError
from engine.common.progress import (
    Phases,
    Progress,
    ProgressCallback,
    check_cancel,
    phases_fraction,
)
from engine.config import RunConfig
from engine.data.datasets import DataBundle
from engine.gkp.plan import PrunePlan
from engine.gkp.traces import LayerDone, MaskSetup, TraceEvent, read_jsonl, write_jsonl
from engine.pipeline import (
    Evaluation,
    PruneOutcome,
    Workspace,
    data_notes,
    evaluate,
    finetune_model,
    load_fitting_data,
    measure_sharpness,
    open_workspace,
    prune,
    save_model,
    warmup,
)
from engine.training.finetune import FinetuneResult
from widgets.heatmap import style_table

from .jobs import ProgressRelay
from .model_scan import inspect_model, single_threaded
from .model_view import ModelInfo
from .session import TRACE_SUFFIX, saved_files

BATCH_TRACE = "decisions.jsonl"  # what batch mode writes beside its pruned.pt
PROGRESS_UNITS = 1000  # progress units per model of an evaluation job


@dataclass
class Opened:
    """The model is open and measured (its data comes next)."""

    workspace: Workspace
    info: ModelInfo
    events: list[TraceEvent]


@dataclass
class DataLoaded:
    """The data of `spec` for the open model and what loading did to its images, or (`data`
    None) why it was refused, in words."""

    spec: str
    data: DataBundle | None
    notes: list[str]
    refused: str = ""


@dataclass
class EvaluationPart:
    """One model's evaluation so far; `complete` once every attack and probe of it is done."""

    label: str
    evaluation: Evaluation
    complete: bool


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


OPEN_PHASES: tuple[str, ...] = ("model", "measure", "data")


def open_model(config: RunConfig, progress: ProgressRelay,
               cancel: threading.Event) -> DataLoaded | None:
    """Open the checkpoint for inspection and measure it (kernel smoothness, MACs), hand that over
    at once (`Opened`), then load and check the data, which the job returns (refused in words
    when the model cannot have been trained on it; None when no data is set). Finds a trace saved
    beside a pruned checkpoint."""
    config = copy.deepcopy(config)
    # The TUI opens for inspection; a job that needs the normalisation asks for it then.
    config.run.stages = ["prune"]
    phases = Phases(OPEN_PHASES, progress)
    with phases.run("model"):
        ws = open_workspace(config, load=False)
        check_cancel(cancel)
    spec = ws.config.data.spec  # the configured one, or the one a workbench checkpoint records
    with phases.run("measure"), single_threaded():
        info = inspect_model(ws.model, ws.cost, config.prune.smoothness_power)
        style_table()  # the heatmap's colour styles, built here rather than on its first draw
        plan = ws.plan
        events = saved_trace(ws.checkpoint.path, plan) if plan is not None else []
    progress.deliver(Opened(ws, info, events))
    if not spec:
        phases.skip("data", "no data set")
        return None
    try:
        with phases.run("data") as report:
            return load_data_for(ws, spec, report, cancel)
    except (ConfigError, DataError) as exc:
        return DataLoaded(spec, None, [], str(exc))


def load_data_for(ws: Workspace, spec: str, progress: ProgressCallback, cancel: threading.Event) -> DataLoaded:
    """The data of `spec` for the open model, refused in words when the model cannot have been
    trained on it (`engine.pipeline.load_fitting_data`)."""
    progress(Progress("data", 0, 1, f"loading {spec}"))
    data = load_fitting_data(ws, spec)
    check_cancel(cancel)
    progress(Progress("data", 1, 1, spec))
    return DataLoaded(spec, data, data_notes(spec, data))


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
    """Write the pruned model, its plan and its decision trace side by side; returns their
    absolute paths."""
    path, plan_path, trace_path = saved_files(path.expanduser().resolve())
    save_model(ws, path, outcome.model, outcome.plan, {"stage": "prune", "source": str(ws.checkpoint.path)})
    outcome.plan.save(plan_path)
    write_jsonl(trace_path, events)
    return [path, plan_path, trace_path]


def finetune_copy(ws: Workspace, base: nn.Module, plan: PrunePlan | None, out_dir: Path | None,
                  progress: ProgressCallback, cancel: threading.Event) -> Finetuned:
    """Fine-tune a copy of `base`, so the model it started from stays as it was."""
    model = copy.deepcopy(base)
    return Finetuned(finetune_model(ws, model, plan, out_dir, progress=progress, cancel=cancel), model)


def evaluate_models(ws: Workspace, models: dict[str, nn.Module], progress: ProgressRelay,
                    cancel: threading.Event) -> dict[str, Evaluation]:
    """The configured attacks and probes on a copy of each model in turn (evaluation moves a model
    to the device and switches its mode, which another job may be reading meanwhile), each result
    handed over as soon as it exists (`EvaluationPart`, per attack and per model). Progress is over
    all models, each taking an equal share, so it never goes back when the next model starts;
    messages name the model and how far its own evaluation is."""
    results: dict[str, Evaluation] = {}
    for number, (label, model) in enumerate(models.items()):

        def relabelled(p: Progress, number: int = number, label: str = label) -> None:
            own = phases_fraction(p.metrics["phases"]) if "phases" in p.metrics else p.fraction or 0.0
            progress(Progress(
                p.stage, int(PROGRESS_UNITS * (number + own)), PROGRESS_UNITS * len(models),
                f"{label} {own:.0%}: {p.stage} {p.message}".strip(),
            ))

        def part(evaluation: Evaluation, label: str = label) -> None:
            progress.deliver(EvaluationPart(label, evaluation, complete=False))

        results[label] = evaluate(ws, copy.deepcopy(model), label=f"{label} model", progress=relabelled,
                                  cancel=cancel, on_result=part)
        progress.deliver(EvaluationPart(label, results[label], complete=True))
    return results


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
