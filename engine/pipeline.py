"""The one pipeline behind batch mode and the TUI: open a model, prune it, deploy it, fine-tune
it, evaluate it. Each stage is a plain function taking a progress callback and a cancel event."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common.distributed import DistContext
from .common.errors import ConfigError, SnapshotError
from .common.memory import release_free_memory
from .common.progress import ProgressCallback, check_cancel
from .config import RunConfig
from .data.datasets import DataBundle, load_data
from .formats.checkpoints import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .formats.snapshots import SnapshotSource, open_snapshots
from .gkp.layers import ConvLayer, discover_layers
from .gkp.plan import PrunePlan
from .gkp.planner import plan_pruning
from .gkp.reconstruct import (
    apply_plan,
    dense_equivalent,
    deploy_summary,
    equivalence_error,
    masked_dense,
)
from .gkp.traces import TraceEvent
from .models.latency import compare_latency
from .models.metrics import ModelCost, count_cost
from .models.normalization import Normalization, parse_normalization
from .models.normalize_layer import Normalize
from .robustness.attacks import RobustnessReport, parse_attack
from .robustness.probes import (
    CorruptionReport,
    FrequencyReport,
    corruption_probe,
    frequency_probe,
)
from .robustness.sharded import evaluate_sharded
from .training.finetune import FinetuneResult, finetune


@dataclass
class Workspace:
    """An opened model with its data, ready for any stage."""

    config: RunConfig
    checkpoint: LoadedCheckpoint
    normalization: Normalization
    normalization_source: str
    data: DataBundle
    device: torch.device
    ctx: DistContext = field(default_factory=DistContext)

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, self.data.in_channels, self.data.image_size, self.data.image_size)

    @cached_property
    def cost(self) -> ModelCost:
        """Params and MACs of the opened model, counted once."""
        return count_cost(self.model, self.input_shape)

    @property
    def plan(self) -> PrunePlan | None:
        """The plan a pruned checkpoint was saved with, if any."""
        return plan_of(self.checkpoint)

    def layers(self) -> list[ConvLayer]:
        """Conv layers with eligibility under the current prune settings."""
        p = self.config.prune
        return discover_layers(
            self.model, groups=p.groups, rate=p.rate, compat=p.compat,  # type: ignore[arg-type]
            skip_stem=p.skip_stem, include_pointwise=p.include_pointwise, exclude=p.exclude,
        )

    def example_batch(self, size: int = 32) -> torch.Tensor:
        """The first `size` test images, normalised: a real batch for equivalence checks."""
        images = torch.stack([self.data.test[i][0] for i in range(min(size, len(self.data.test)))])
        return Normalize(self.normalization)(images)


def open_workspace(config: RunConfig) -> Workspace:
    """Load the configured checkpoint, its normalisation and the dataset."""
    config.validate()
    if not config.model.checkpoint:
        raise ConfigError("no checkpoint to open: set model.checkpoint")
    path = Path(config.model.checkpoint)
    override = parse_normalization(config.model.normalize) if config.model.normalize else None
    checkpoint = load_checkpoint(
        path, arch=config.model.arch or None, normalization=override,
        trust_pickle=config.model.trust_pickle,
    )
    in_channels = int(checkpoint.arch.params.get("in_channels", 3))
    data = load_data(
        config.data.spec, channels=in_channels, image_size=config.data.image_size or None,
        seed=config.run.seed, val_fraction=config.data.val_fraction,
    )
    if override is not None:
        norm, source = override, "set by the user"
    elif checkpoint.normalization is not None:
        norm, source = checkpoint.normalization, "stored in the checkpoint"
    elif {"finetune", "evaluate"} & set(config.run.stages):
        raise ConfigError(
            f"{path.name} does not record its input normalisation; pass --normalize "
            "(cifar10, imagenet, none or MEAN,STD) as the model was trained"
        )
    else:
        norm, source = data.normalization, "unknown: the dataset's own statistics are used"
    norm = norm.for_channels(in_channels)
    ctx = DistContext.from_env(config.run.device)
    return Workspace(config, checkpoint, norm, source, data, ctx.device, ctx)


def check_prunable(ws: Workspace) -> None:
    """Raise `ConfigError` when the prune settings leave no layer of this model to prune,
    naming why each layer is skipped."""
    layers = ws.layers()
    if any(layer.eligible for layer in layers):
        return
    reasons = "; ".join(f"{layer.name}: {layer.reason}" for layer in layers[:4])
    more = f"; and {len(layers) - 4} more" if len(layers) > 4 else ""
    raise ConfigError(
        f"no conv layer can be pruned with groups={ws.config.prune.groups}, "
        f"rate={ws.config.prune.rate} ({reasons}{more})"
    )


def load_ticket_snapshots(ws: Workspace) -> SnapshotSource:
    """Training snapshots of the ticket window for TMI-GKP, from the configured folder or
    archive, read one at a time as pruning asks for them."""
    if ws.config.model.snapshots:
        source = Path(ws.config.model.snapshots)
    else:
        raise SnapshotError(
            "TMI-GKP needs training snapshots of the ticket window: pass --snapshots DIR "
            "(a folder of per-epoch checkpoints)"
        )
    p = ws.config.prune
    return open_snapshots(
        source, reference=ws.checkpoint.state_dict, window=tuple(p.ticket_window), step=p.ticket_step
    )


@dataclass
class PruneOutcome:
    """A pruned model (grouped form: the one to train and save), its deployed form, and the
    measurements that show what pruning did."""

    plan: PrunePlan
    model: nn.Module
    deployed: nn.Module
    cost_before: ModelCost
    cost_after: ModelCost
    equivalence_max_abs_err: float
    seconds: float
    step_seconds: dict[str, float]
    latency_ms: dict[str, float]
    latency_batch: int
    deploy: dict[str, Any] = field(default_factory=dict)


def prune(
    ws: Workspace,
    *,
    on_event: Callable[[TraceEvent], None] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PruneOutcome:
    """Plan the pruning with the configured method, rebuild the model in grouped and deployed
    form, and check both against the masked dense model on a real test batch."""
    config = ws.config
    check_prunable(ws)
    snapshots = load_ticket_snapshots(ws) if needs_snapshots(config) else None
    start = time.perf_counter()
    plan = plan_pruning(
        ws.model, config.prune, snapshots=snapshots, arch=ws.checkpoint.arch.to_dict(),
        on_event=on_event, progress=progress, cancel=cancel,
    )
    steps = {"plan": time.perf_counter() - start}
    release_free_memory()  # the search's temporaries, before the model copies below
    check_cancel(cancel)
    mark = time.perf_counter()
    original = ws.model.to(ws.device).eval()
    batch = ws.example_batch().to(ws.device)
    size = config.deploy.latency_batch
    latency_input = batch[:size].repeat((size + len(batch) - 1) // len(batch), 1, 1, 1)[:size]
    grouped = apply_plan(original, plan, form="grouped")
    deployed = (
        grouped if config.deploy.form == "grouped"
        else apply_plan(original, plan, form=config.deploy.form, example_input=latency_input)
    )
    steps["rebuild"], mark = time.perf_counter() - mark, time.perf_counter()
    check_cancel(cancel)
    masked = masked_dense(original, plan, share_unplanned=True)
    error = max(equivalence_error(grouped, masked, batch), equivalence_error(deployed, masked, batch))
    del masked
    steps["check"], mark = time.perf_counter() - mark, time.perf_counter()
    check_cancel(cancel)
    timing = compare_latency({"original": original, "pruned": deployed}, latency_input, device=ws.device)
    steps["latency"] = time.perf_counter() - mark
    before, after = timing["original"], timing["pruned"]
    return PruneOutcome(
        plan=plan,
        model=grouped,
        deployed=deployed,
        cost_before=ws.cost,
        cost_after=count_cost(grouped, ws.input_shape),
        equivalence_max_abs_err=error,
        seconds=steps["plan"],
        step_seconds=steps,
        latency_ms={"original": before, "pruned": after, "speedup": before / after if after else 0.0},
        latency_batch=size,
        deploy=deploy_summary(deployed),
    )


def save_model(ws: Workspace, path: Path, model: nn.Module, plan: PrunePlan | None, metadata: dict[str, Any]) -> None:
    """Write a workbench checkpoint that reopens with no flags (arch, normalisation, plan)."""
    save_checkpoint(path, model, ws.checkpoint.arch, ws.normalization, plan=plan, metadata=metadata)


def finetune_model(
    ws: Workspace,
    model: nn.Module,
    plan: PrunePlan | None,
    out_dir: Path | None,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> FinetuneResult:
    """Fine-tune `model` with the configured settings; best checkpoints are full workbench
    checkpoints, tracked on the validation split."""
    return finetune(
        model, ws.data, ws.normalization, ws.config.finetune, out_dir, resume=resume,
        save_model=lambda path, m, meta: save_model(ws, path, m, plan, meta),
        progress=progress, cancel=cancel, ctx=ws.ctx,
    )


@dataclass
class Evaluation:
    """Clean and robust accuracy of one model, with the optional probes."""

    robustness: RobustnessReport
    frequency: FrequencyReport | None
    corruption: CorruptionReport | None

    def to_dict(self) -> dict[str, Any]:
        report = self.robustness
        return {
            "clean_acc": report.clean_acc,
            "n_examples": report.n_examples,
            "attacks": {a.label: a.accuracy for a in report.attacks},
            "eps_space": report.eps_space,
            "seconds": report.seconds,
            "images_per_second": report.images_per_second,
            "frequency": None if self.frequency is None else self.frequency.to_dict(),
            "corruption": None if self.corruption is None else self.corruption.to_dict(),
        }


def evaluate(
    ws: Workspace,
    model: nn.Module,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Evaluation:
    """Attack suite and probes on the test split, on the same examples, run on the dense
    equivalent of a pruned model. Under torchrun the attacks are sharded over the processes and
    the probes run on rank 0 only."""
    cfg = ws.config.evaluate
    model = dense_equivalent(model)
    common = dict(
        device=str(ws.device), batch_size=cfg.batch_size, progress=progress, cancel=cancel,
    )
    limit = cfg.max_examples or None
    robustness = evaluate_sharded(
        model, ws.normalization, ws.data.test, [parse_attack(a) for a in cfg.attacks], ctx=ws.ctx,
        max_examples=limit, eps_space=cfg.eps_space, seed=ws.config.run.seed, **common,
    )
    probe = ws.ctx.is_main
    frequency = (
        frequency_probe(model, ws.normalization, ws.data.test, thresholds=tuple(cfg.thresholds),
                        max_examples=limit, **common)
        if cfg.frequency and probe else None
    )
    corruption = (
        corruption_probe(model, ws.normalization, ws.data.test, severities=tuple(cfg.severities),
                         max_examples=limit, **common)
        if cfg.corruption and probe else None
    )
    return Evaluation(robustness, frequency, corruption)


def needs_snapshots(config: RunConfig) -> bool:
    """Whether the configured grouping is TMI-driven and so needs training snapshots."""
    return config.prune.resolved_grouping == "tmi"


def check_evaluation_config(config: RunConfig) -> None:
    """Parse every attack now, so a typo fails before any work or output."""
    for text in config.evaluate.attacks:
        parse_attack(text)


def plan_of(checkpoint: LoadedCheckpoint) -> PrunePlan | None:
    """The plan stored in a pruned workbench checkpoint."""
    return None if checkpoint.plan is None else PrunePlan.from_dict(checkpoint.plan)


def prune_sections(outcome: PruneOutcome) -> dict[str, Any]:
    """The `prune` and `deploy` sections of the report."""
    plan, before, after = outcome.plan, outcome.cost_before, outcome.cost_after
    return {
        "prune": {
            "method": plan.method,
            "grouping": plan.params.get("grouping"),
            "selection": plan.params.get("selection"),
            "rate": plan.params.get("rate"),
            "groups": plan.params.get("groups"),
            "params": plan.params,
            "params_before": before.params,
            "params_after": after.params,
            "params_reduction": 1 - after.params / before.params,
            "macs_before": before.macs,
            "macs_after": after.macs,
            "macs_reduction": 1 - after.macs / before.macs,
            "seconds": outcome.seconds,
            "step_seconds": outcome.step_seconds,
            "equivalence_max_abs_err": outcome.equivalence_max_abs_err,
            "layers": [
                {"name": l.name, "in_channels": l.in_channels, "out_channels": l.out_channels,
                 "kept": l.kept, "achieved_ratio": l.achieved_ratio}
                for l in plan.layers
            ],
            "layers_skipped": [{"name": s.name, "reason": s.reason} for s in plan.skipped],
        },
        "deploy": {
            "form": outcome.deploy.get("form"),
            "batch": outcome.latency_batch,
            "latency_ms": outcome.latency_ms,
            "layers": outcome.deploy.get("layers"),
        },
    }


def finetune_section(ws: Workspace, result: FinetuneResult) -> dict[str, Any]:
    """The `finetune` section of the report: the settings that matter most, then the result."""
    config = ws.config.finetune
    images = sum(r.images_per_second * r.seconds for r in result.history)
    train_seconds = sum(r.seconds for r in result.history)
    return {
        "epochs": config.epochs,
        "mode": config.mode,
        "lr": config.lr,
        "schedule": config.schedule,
        "batch_size": config.batch_size,
        "images_per_second": images / train_seconds if train_seconds else 0.0,
        **result.to_dict(),
    }
