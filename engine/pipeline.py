"""The one pipeline behind batch mode and the TUI: open a model, prune it, deploy it, fine-tune
it, evaluate it. Each stage is a plain function taking a progress callback and a cancel event."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common.distributed import DistContext
from .common.errors import ConfigError, SnapshotError
from .common.progress import Phases, ProgressCallback, check_cancel
from .config import RunConfig
from .data.datasets import DEFAULT_IMAGE_SIZE, DataBundle, load_data
from .data.spec import SPEC_HELP, parse_data_spec
from .formats.checkpoints import LoadedCheckpoint, load_checkpoint, save_checkpoint
from .formats.snapshots import load_snapshots
from .gkp.layers import ConvLayer, discover_layers
from .gkp.plan import PrunePlan
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
from .models.normalization import (
    UNKNOWN_NORMALIZATION,
    Normalization,
    parse_normalization,
)
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
    """An opened model with its data (None until loaded, or when none is set), ready for any
    stage."""

    config: RunConfig
    checkpoint: LoadedCheckpoint
    normalization: Normalization
    normalization_source: str
    data: DataBundle | None
    device: torch.device
    ctx: DistContext = field(default_factory=DistContext)

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model

    @property
    def in_channels(self) -> int:
        return int(self.checkpoint.arch.params.get("in_channels", 3))

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """One image as the model runs on it: the data's size, else the configured or default one
        (which is what loading the data will give)."""
        size = self.data.image_size if self.data is not None else self.config.data.image_size or DEFAULT_IMAGE_SIZE
        return (1, self.in_channels, size, size)

    @cached_property
    def cost(self) -> ModelCost:
        """Params and MACs of the opened model, counted once."""
        return count_cost(self.model, self.input_shape)

    @property
    def plan(self) -> PrunePlan | None:
        """The plan a pruned checkpoint was saved with, if any."""
        return plan_of(self.checkpoint)

    def require_data(self, what: str) -> DataBundle:
        """The dataset, or `ConfigError` saying that `what` needs one."""
        if self.data is None:
            raise ConfigError(f"{what} needs data and none is set ({SPEC_HELP})")
        return self.data

    def layers(self) -> list[ConvLayer]:
        """Conv layers with eligibility under the current prune settings."""
        p = self.config.prune
        return discover_layers(
            self.model, groups=p.groups, rate=p.rate, compat=p.compat,  # type: ignore[arg-type]
            skip_stem=p.skip_stem, include_pointwise=p.include_pointwise, exclude=p.exclude,
        )

    def example_batch(self, size: int = 32) -> torch.Tensor:
        """The first `size` test images, normalised: a real batch for equivalence checks. Without
        data, seeded uniform random images stand in."""
        if self.data is None:
            generator = torch.Generator().manual_seed(self.config.run.seed)
            images = torch.rand((size, *self.input_shape[1:]), generator=generator)
        else:
            images = torch.stack([self.data.test[i][0] for i in range(min(size, len(self.data.test)))])
        return Normalize(self.normalization)(images)


def open_workspace(config: RunConfig) -> Workspace:
    """Load the configured checkpoint, its normalisation and the dataset (none when `data.spec`
    is empty)."""
    config.validate()
    if not config.model.checkpoint:
        raise ConfigError("no checkpoint to open: set model.checkpoint")
    override = parse_normalization(config.model.normalize) if config.model.normalize else None
    checkpoint = load_checkpoint(
        Path(config.model.checkpoint), arch=config.model.arch or None, normalization=override,
        trust_pickle=config.model.trust_pickle,
    )
    if override is not None:
        norm, source = override, "set by the user"
    elif checkpoint.normalization is not None:
        norm, source = checkpoint.normalization, "stored in the checkpoint"
    elif {"finetune", "evaluate"} & set(config.run.stages):
        raise ConfigError(
            f"{checkpoint.path.name} does not record its input normalisation; pass --normalize "
            "(cifar10, imagenet, none or MEAN,STD) as the model was trained"
        )
    else:
        norm, source = parse_normalization("none"), f"{UNKNOWN_NORMALIZATION}: none applied (no data to estimate it from)"
    ctx = DistContext.from_env(config.run.device)
    in_channels = int(checkpoint.arch.params.get("in_channels", 3))
    ws = Workspace(config, checkpoint, norm.for_channels(in_channels), source, None, ctx.device, ctx)
    if not config.data.spec:
        return ws
    data = load_data(
        config.data.spec, channels=in_channels, image_size=config.data.image_size or None,
        seed=config.run.seed, val_fraction=config.data.val_fraction,
    )
    return with_data(ws, data)


def with_data(ws: Workspace, data: DataBundle | None) -> Workspace:
    """`ws` using `data`; a normalisation the checkpoint does not record is then the data's own
    statistics (and marked as a guess)."""
    if data is None or not ws.normalization_source.startswith(UNKNOWN_NORMALIZATION):
        return replace(ws, data=data)
    guessed = data.normalization.for_channels(ws.in_channels)
    return replace(ws, data=data, normalization=guessed,
                   normalization_source=f"{UNKNOWN_NORMALIZATION}: the dataset's own statistics are used")


def check_data_fit(ws: Workspace, spec: str, classes: int | None = None) -> None:
    """Refuse (`ConfigError`, in words) data the model cannot have been trained on: images stored
    with other channels than the model takes (they would be converted), or another number of
    classes than the model's outputs. Decided from the spec alone where the dataset fixes these
    (so before loading anything), else from `classes` once loaded."""
    parsed = parse_data_spec(spec)
    stored, channels = parsed.native_channels, ws.in_channels
    if stored is not None and stored != channels:
        raise ConfigError(
            f"{parsed.kind} images have {_count(stored, 'channel')} but the model takes {channels}: "
            "choose the data the model was trained on"
        )
    outputs = ws.checkpoint.arch.params.get("num_classes")
    found = classes if classes is not None else parsed.classes
    if outputs is not None and found is not None and int(outputs) != found:
        raise ConfigError(
            f"the model has {_count(int(outputs), 'output')} but {parsed.kind} has {found} classes: "
            "choose the data the model was trained on"
        )


def load_fitting_data(ws: Workspace, spec: str) -> DataBundle:
    """The dataset of `spec` for this model, refused as `check_data_fit` says."""
    check_data_fit(ws, spec)
    config = ws.config
    data = load_data(spec, channels=ws.in_channels, image_size=config.data.image_size or None,
                     seed=config.run.seed, val_fraction=config.data.val_fraction)
    check_data_fit(ws, spec, data.num_classes)
    return data


def data_notes(spec: str, data: DataBundle) -> list[str]:
    """What loading did to the stored images (scaling), said in words."""
    size = parse_data_spec(spec).native_size
    if size is not None and size != data.image_size:
        return [f"{size}×{size} images scaled to {data.image_size}×{data.image_size}"]
    return []


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


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


def load_ticket_snapshots(ws: Workspace) -> dict[int, dict[str, torch.Tensor]]:
    """Training snapshots of the ticket window for TMI-GKP, from the configured folder or
    archive."""
    if ws.config.model.snapshots:
        source = Path(ws.config.model.snapshots)
    else:
        raise SnapshotError(
            "TMI-GKP needs training snapshots of the ticket window: pass --snapshots DIR "
            "(a folder of per-epoch checkpoints)"
        )
    p = ws.config.prune
    return load_snapshots(
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
    latency_ms: dict[str, float]
    latency_batch: int
    deploy: dict[str, Any] = field(default_factory=dict)


PRUNE_PHASES: tuple[str, ...] = ("plan", "reconstruct", "equivalence", "latency")


def prune(
    ws: Workspace,
    *,
    on_event: Callable[[TraceEvent], None] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PruneOutcome:
    """Plan the pruning with the configured method, rebuild the model in grouped and deployed
    form, check both against the masked dense model on a real test batch and time them. Progress
    names each of `PRUNE_PHASES` with its own fraction and time (`Phases`)."""
    from .gkp.planner import (
        plan_pruning,  # deferred: it loads scipy (~1 s), which opening a model does not need
    )

    config = ws.config
    check_prunable(ws)
    phases = Phases(PRUNE_PHASES, progress)
    with phases.run("plan") as report:
        snapshots = load_ticket_snapshots(ws) if needs_snapshots(config) else None
        start = time.perf_counter()
        plan = plan_pruning(
            ws.model, config.prune, snapshots=snapshots, arch=ws.checkpoint.arch.to_dict(),
            on_event=on_event, progress=report, cancel=cancel,
        )
        seconds = time.perf_counter() - start
        check_cancel(cancel)
    with phases.run("reconstruct"):
        original = ws.model.to(ws.device).eval()
        batch = ws.example_batch().to(ws.device)
        size = config.deploy.latency_batch
        latency_input = batch[:size].repeat((size + len(batch) - 1) // len(batch), 1, 1, 1)[:size]
        grouped = apply_plan(original, plan, form="grouped")
        deployed = (
            grouped if config.deploy.form == "grouped"
            else apply_plan(original, plan, form=config.deploy.form, example_input=latency_input)
        )
        cost_after = count_cost(grouped, ws.input_shape)
        check_cancel(cancel)
    with phases.run("equivalence"):
        masked = masked_dense(original, plan)
        error = max(equivalence_error(grouped, masked, batch), equivalence_error(deployed, masked, batch))
        check_cancel(cancel)
    with phases.run("latency"):
        timing = compare_latency({"original": original, "pruned": deployed}, latency_input, device=ws.device)
        check_cancel(cancel)
    before, after = timing["original"], timing["pruned"]
    return PruneOutcome(
        plan=plan,
        model=grouped,
        deployed=deployed,
        cost_before=ws.cost,
        cost_after=cost_after,
        equivalence_max_abs_err=error,
        seconds=seconds,
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
        model, ws.require_data("fine-tuning"), ws.normalization, ws.config.finetune, out_dir, resume=resume,
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


EVALUATE_PHASES: tuple[str, ...] = ("attacks", "frequency", "corruption")


def evaluate(
    ws: Workspace,
    model: nn.Module,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    on_result: Callable[[Evaluation], None] | None = None,
) -> Evaluation:
    """Attack suite and probes on the test split, on the same examples, run on the dense
    equivalent of a pruned model. Progress names each of `EVALUATE_PHASES` (`Phases`; a probe
    that is off is skipped); `on_result` receives the evaluation so far after the clean pass,
    each attack and each probe. Under torchrun the attacks are sharded over the processes and the
    probes run on rank 0 only."""
    cfg = ws.config.evaluate
    data = ws.require_data("evaluation")
    model = dense_equivalent(model)
    phases = Phases(EVALUATE_PHASES, progress)
    common = dict(device=str(ws.device), batch_size=cfg.batch_size, cancel=cancel)
    limit = cfg.max_examples or None
    frequency: FrequencyReport | None = None
    corruption: CorruptionReport | None = None

    def deliver(robustness: RobustnessReport) -> None:
        if on_result is not None:
            on_result(Evaluation(robustness, frequency, corruption))

    with phases.run("attacks") as report:
        robustness = evaluate_sharded(
            model, ws.normalization, data.test, [parse_attack(a) for a in cfg.attacks], ctx=ws.ctx,
            max_examples=limit, eps_space=cfg.eps_space, seed=ws.config.run.seed, progress=report,
            on_report=deliver, **common,
        )
    probe = ws.ctx.is_main
    for name, wanted in (("frequency", cfg.frequency), ("corruption", cfg.corruption)):
        if not (wanted and probe):
            phases.skip(name, "off" if not wanted else "rank 0 runs the probes")
            continue
        with phases.run(name) as report:
            if name == "frequency":
                frequency = frequency_probe(model, ws.normalization, data.test, thresholds=tuple(cfg.thresholds),
                                            max_examples=limit, progress=report, **common)
            else:
                corruption = corruption_probe(model, ws.normalization, data.test, severities=tuple(cfg.severities),
                                              max_examples=limit, progress=report, **common)
        deliver(robustness)
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
