"""The one pipeline behind batch mode and the TUI: open a model, warm it up (AdaSAP), prune it
(GKP, in-train pruning, L1 filters; progressively after a warmup), deploy it, fine-tune it,
evaluate it. Each stage is a plain function taking a progress callback and a cancel event."""

from __future__ import annotations

import copy
import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adasap.phases import PhaseOutcome, run_progressive, run_warmup
from .adasap.sharpness import Sharpness, sharpness
from .baselines.filter_pruning import filter_plan
from .common.distributed import DistContext
from .common.errors import Cancelled, ConfigError, DataError, SnapshotError
from .common.memory import release_free_memory
from .common.progress import Phases, ProgressCallback, part_progress
from .config import RunConfig
from .data.datasets import DEFAULT_IMAGE_SIZE, DataBundle, load_data
from .data.spec import SPEC_HELP, parse_data_spec
from .formats.checkpoints import (
    WORKBENCH_FORMAT,
    LoadedCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from .formats.snapshots import SnapshotSource, open_snapshots
from .gkp.layers import ConvLayer, discover_layers
from .gkp.plan import PrunePlan
from .gkp.reconstruct import (
    apply_plan,
    dense_equivalent,
    deploy_summary,
    equivalence_error,
    masked_dense,
)
from .gkp.traces import SharpnessMeasured, TraceEvent
from .itp.trainer import ItpOutcome, itp_setup, run_itp
from .models.batchnorm import (
    Recalibration,
    copy_batchnorm_statistics,
    recalibrate_batchnorm,
)
from .models.latency import RoundTimes, interleaved_latency, latency_verdict
from .models.metrics import ModelCost, count_cost
from .models.normalization import (
    UNKNOWN_NORMALIZATION,
    Normalization,
    parse_normalization,
)
from .models.normalize_layer import Normalize
from .models.surgery import filter_batchnorm_channels, filter_chains
from .robustness.attacks import RobustnessReport, evaluate_robustness, parse_attack
from .robustness.collapse import collapse_warnings
from .robustness.probes import CorruptionReport, FrequencyReport
from .robustness.sharded import corruption_sharded, evaluate_sharded, frequency_sharded
from .training.finetune import FinetuneResult, finetune

DATA_KEY = "data"  # checkpoint metadata: the data spec a workbench checkpoint was made with
SET_DATA = "--data, or the data field"  # where a user sets the data: batch flag, TUI field
NO_DATA = (
    "no data is set, so BatchNorm statistics were not recalibrated and accuracy was not measured "
    f"(the pruned model's accuracy may have collapsed); set the data ({SET_DATA})"
)


@dataclass
class Workspace:
    """An opened model with its data (None when none is set: the engine never guesses one),
    ready for any stage."""

    config: RunConfig
    checkpoint: LoadedCheckpoint
    normalization: Normalization
    normalization_source: str
    data: DataBundle | None
    device: torch.device
    ctx: DistContext = field(default_factory=DistContext)
    data_source: str = "configured"

    @property
    def model(self) -> nn.Module:
        return self.checkpoint.model

    @property
    def in_channels(self) -> int:
        return model_channels(self.checkpoint)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        size = self.data.image_size if self.data is not None else self.config.data.image_size or DEFAULT_IMAGE_SIZE
        return (1, self.in_channels, size, size)

    def require_data(self, what: str) -> DataBundle:
        """The dataset, or `ConfigError` saying that `what` needs one."""
        if self.data is None:
            raise ConfigError(f"{what} needs data and none is set: set it ({SET_DATA}; {SPEC_HELP})")
        return self.data

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

    @property
    def example_source(self) -> str:
        """What `example_batch` holds, for reports."""
        return "test images" if self.data is not None else "random images (no data set)"

    def example_batch(self, size: int = 32) -> torch.Tensor:
        """The first `size` test images, normalised: a real batch for equivalence checks and
        timing. Without data, seeded uniform random images stand in."""
        if self.data is None:
            generator = torch.Generator().manual_seed(self.config.run.seed)
            images = torch.rand((size, *self.input_shape[1:]), generator=generator)
        else:
            images = torch.stack([self.data.test[i][0] for i in range(min(size, len(self.data.test)))])
        return Normalize(self.normalization)(images)


def open_workspace(config: RunConfig, *, load: bool = True) -> Workspace:
    """Load the configured checkpoint, its normalisation and the dataset (none when `data.spec`
    is empty, unless the checkpoint is the workbench's and records the data it was made with).
    With `load` False the data is only chosen (`config.data.spec`), not loaded, so a front end
    can show the model first and load the data after (`load_fitting_data`, `with_data`)."""
    config.validate()
    if not config.model.checkpoint:
        raise ConfigError("no checkpoint to open: set model.checkpoint")
    path = Path(config.model.checkpoint)
    override = parse_normalization(config.model.normalize) if config.model.normalize else None
    checkpoint = load_checkpoint(
        path, arch=config.model.arch or None, normalization=override,
        trust_pickle=config.model.trust_pickle,
    )
    in_channels = model_channels(checkpoint)
    needing = [stage for stage in ("warmup", "finetune", "evaluate") if stage in config.run.stages]
    data, data_source = None, "configured"
    recorded = checkpoint.metadata.get(DATA_KEY)
    if not config.data.spec and checkpoint.source_format.startswith(WORKBENCH_FORMAT) and isinstance(recorded, str):
        # A checkpoint the workbench wrote names the data it was made with, as it stores the
        # normalisation: the resolved config (and so config.toml) says which data was used.
        config.data.spec, data_source = recorded, "recorded in the checkpoint"
    if config.data.spec and load:
        try:
            data = load_data(
                config.data.spec, channels=in_channels, image_size=config.data.image_size or None,
                seed=config.run.seed, val_fraction=config.data.val_fraction,
            )
        except DataError as exc:
            if data_source == "configured":
                raise
            raise DataError(f"{exc} (the data {path.name} records; to use other data: {SET_DATA})") from None
        check_fit(checkpoint, data, config.data.spec)
    elif needing and load:
        stages = f"the {' and '.join(needing)} stage{'s need' if len(needing) > 1 else ' needs'}"
        raise ConfigError(
            f"{stages} data and none is set: set it ({SET_DATA}; {SPEC_HELP}); "
            "the workbench does not guess which dataset a model was trained on"
        )
    if override is not None:
        norm, source = override, "set by the user"
    elif checkpoint.normalization is not None:
        norm, source = checkpoint.normalization, "stored in the checkpoint"
    elif needing:
        raise unknown_normalization(checkpoint.path)
    elif data is not None:
        norm, source = data.normalization, GUESSED_FROM_DATA
    else:
        norm, source = parse_normalization("none"), f"{UNKNOWN_NORMALIZATION}: none applied (no data to estimate it from)"
    norm = norm.for_channels(in_channels)
    ctx = DistContext.from_env(config.run.device)
    return Workspace(config, checkpoint, norm, source, data, ctx.device, ctx, data_source)


GUESSED_FROM_DATA = f"{UNKNOWN_NORMALIZATION}: the dataset's own statistics are used"


def model_channels(checkpoint: LoadedCheckpoint) -> int:
    """Input channels the model takes (3 where its architecture does not say)."""
    return int(checkpoint.arch.params.get("in_channels", 3))


def with_data(ws: Workspace, data: DataBundle | None, source: str | None = None) -> Workspace:
    """`ws` using `data` (loaded after opening, `source` saying where its spec came from when not
    where the workspace's did); a normalisation the checkpoint does not record is then the data's
    own statistics (and marked as a guess)."""
    changes: dict[str, Any] = {"data": data, "data_source": source or ws.data_source}
    if data is not None and ws.normalization_source.startswith(UNKNOWN_NORMALIZATION):
        changes.update(normalization=data.normalization.for_channels(ws.in_channels),
                       normalization_source=GUESSED_FROM_DATA)
    new = replace(ws, **changes)
    if "cost" in ws.__dict__ and new.input_shape == ws.input_shape:
        # Counted already: counting again would switch the shared model's mode while jobs read it.
        new.__dict__["cost"] = ws.cost
    return new


def check_fit(checkpoint: LoadedCheckpoint, data: DataBundle, spec: str) -> None:
    """Refuse data the model cannot have been trained on: a different class count, or images
    stored with a different number of channels (a grey dataset for an RGB model, or the reverse)."""
    _refuse_misfit(checkpoint, spec, data.source_channels, data.num_classes)


def check_spec_fit(checkpoint: LoadedCheckpoint, spec: str) -> None:
    """`check_fit` decided from the spec alone, where the dataset fixes channels and classes, so
    a front end refuses before loading anything."""
    parsed = parse_data_spec(spec)
    _refuse_misfit(checkpoint, spec, parsed.native_channels, parsed.classes)


def _refuse_misfit(checkpoint: LoadedCheckpoint, spec: str, stored: int | None, classes: int | None) -> None:
    outputs = checkpoint.arch.params.get("num_classes")
    if outputs is not None and classes is not None and int(outputs) != classes:
        raise ConfigError(
            f"the model has {outputs} outputs but {spec} has {classes} classes: "
            f"use the data the model was trained on ({SET_DATA})"
        )
    channels = model_channels(checkpoint)
    if stored is not None and stored != channels:
        raise ConfigError(
            f"{spec} images have {stored} channel{'s' if stored != 1 else ''} "
            f"but the model takes {channels}: use the data the model was trained on ({SET_DATA})"
        )


def load_fitting_data(ws: Workspace, spec: str) -> DataBundle:
    """The dataset of `spec` for this model, refused as `check_fit` says (from the spec first,
    so a refusal costs no loading)."""
    check_spec_fit(ws.checkpoint, spec)
    config = ws.config
    data = load_data(spec, channels=ws.in_channels, image_size=config.data.image_size or None,
                     seed=config.run.seed, val_fraction=config.data.val_fraction)
    check_fit(ws.checkpoint, data, spec)
    return data


def data_notes(spec: str, data: DataBundle) -> list[str]:
    """What loading did to the stored images (scaling), said in words."""
    size = parse_data_spec(spec).native_size
    if size is not None and size != data.image_size:
        return [f"{size}×{size} images scaled to {data.image_size}×{data.image_size}"]
    return []


def unknown_normalization(path: Path) -> ConfigError:
    """The error for a checkpoint without its input normalisation, where a stage needs it."""
    return ConfigError(
        f"{path.name} does not record its input normalisation; pass --normalize "
        "(cifar10, imagenet, none or MEAN,STD) as the model was trained"
    )


def trains_to_prune(config: RunConfig) -> bool:
    """Whether the prune stage trains (in-train pruning, or AdaSAP's progressive pruning)."""
    return "prune" in config.run.stages and (config.prune.method == "itp" or progressive(config))


def progressive(config: RunConfig) -> bool:
    """Whether pruning follows AdaSAP's progressive schedule: a run with a warmup stage, pruning
    epochs, and a method that plans after training (in-train pruning is its own schedule)."""
    return config.adasap and config.warmup.pruning_epochs > 0 and config.prune.method != "itp"


def check_prune_input(ws: Workspace) -> None:
    """Fail before any work when the configured method cannot prune this model: no eligible
    layer, an architecture L1 filter pruning does not know, missing TMI snapshots, or, for a
    method that trains, no data or an unknown input normalisation."""
    method = ws.config.prune.method
    if trains_to_prune(ws.config):
        ws.require_data("in-train pruning" if method == "itp" else "progressive pruning")
        if ws.normalization_source.startswith(UNKNOWN_NORMALIZATION):
            raise unknown_normalization(ws.checkpoint.path)
    if method == "l1-filter":
        filter_chains(ws.model)
    elif method == "itp":
        if ws.ctx.distributed:
            raise ConfigError("in-train pruning runs in one process (its masks join the gradient only inside the "
                              "pruning window, which DistributedDataParallel cannot follow); run it without torchrun")
        itp_setup(ws.model, ws.config.prune, ws.config.itp, ws.input_shape)
    else:
        check_prunable(ws)
    if needs_snapshots(ws.config):
        load_ticket_snapshots(ws)


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
class AccuracyCheck:
    """Validation accuracy right after pruning, on the same `n` images: the unpruned model, the
    pruned one with its stale BatchNorm statistics (`raw`) and after recalibration (None when
    recalibration was off or found no BatchNorm); `warnings` flag collapsed models in words."""

    split: str
    n: int
    before: float
    raw: float
    recalibrated: float | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "n": self.n, "before": self.before, "raw": self.raw,
                "recalibrated": self.recalibrated}


@dataclass
class PruneOutcome:
    """A pruned model (grouped form: the one to train and save), its deployed form, and the
    measurements that show what pruning did. `accuracy` and `recalibration` are None without
    data; `notes` say what was skipped and why; `snapshots` names the TMI tickets used.
    `effective_macs` counts only the MACs of weights that are kept (for zeroed-weight masks less
    than the deployed model computes); `details` holds what a method adds to the report
    (in-train pruning's masks, AdaSAP's progressive schedule)."""

    plan: PrunePlan
    model: nn.Module
    deployed: nn.Module
    cost_before: ModelCost
    cost_after: ModelCost
    equivalence_max_abs_err: float
    equivalence_input: str
    seconds: float
    step_seconds: dict[str, float]
    latency: dict[str, RoundTimes]
    latency_batch: int
    deploy: dict[str, Any] = field(default_factory=dict)
    accuracy: AccuracyCheck | None = None
    recalibration: Recalibration | None = None
    snapshots: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    effective_macs: int | None = None
    target_macs: int | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def latency_verdict(self) -> str:
        """faster, slower or within noise (the pruned model against the original); always within
        noise when no pruned layer is deployed grouped and no filter was removed, since the
        deployed model then runs the original's convolutions with zeros in place of the pruned
        weights."""
        if not self.deploy.get("counts", {}).get("grouped") and not self.plan.filters:
            return "within noise"
        return latency_verdict(self.latency["original"], self.latency["pruned"])

    @property
    def speedup(self) -> float:
        """Original over pruned median latency."""
        after = self.latency["pruned"].median_ms
        return self.latency["original"].median_ms / after if after else 0.0

    @property
    def warnings(self) -> list[str]:
        """Everything a reader of the numbers must know: skipped steps and collapsed models."""
        return [*self.notes, *([] if self.accuracy is None else self.accuracy.warnings)]


def method_plan(ws: Workspace, model: nn.Module, rate: float, *, snapshots: SnapshotSource | None,
                on_event: Callable[[TraceEvent], None] | None = None, progress: ProgressCallback | None = None,
                cancel: threading.Event | None = None) -> PrunePlan:
    """The plan the configured method (GKP or L1 filters) makes of `model`'s current weights at `rate`."""
    from .gkp.planner import (
        plan_pruning,  # deferred: it loads scipy (~1 s), which opening a model does not need
    )

    config = dataclasses.replace(ws.config.prune, rate=rate)
    arch = ws.checkpoint.arch.to_dict()
    if config.method == "l1-filter":
        return filter_plan(model, config, ws.input_shape, arch)[0]
    return plan_pruning(model, config, snapshots=snapshots, arch=arch, on_event=on_event, progress=progress,
                        cancel=cancel)
def validation_accuracy(
    ws: Workspace, model: nn.Module, what: str, *,
    progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
) -> RobustnessReport:
    """Clean accuracy of `model` on the whole validation split (no attack), with how often it
    predicted each class."""
    data = ws.require_data("measuring accuracy")
    return evaluate_robustness(
        model, ws.normalization, data.val, [], batch_size=ws.config.evaluate.batch_size,
        device=str(ws.device), seed=ws.config.run.seed, progress=part_progress(progress, 0, 1, what),
        cancel=cancel,
    )


def recalibrate_and_check(
    ws: Workspace, original: nn.Module, masked: nn.Module, *,
    progress: ProgressCallback | None = None, cancel: threading.Event | None = None,
) -> tuple[AccuracyCheck, Recalibration | None]:
    """Measure the unpruned and the freshly pruned model (`masked`, its dense form) on the
    validation split, re-estimate `masked`'s BatchNorm statistics on training images (SPEC §7,
    `prune.recalibrate_images`; in place) and measure it again."""
    data = ws.require_data("recalibration")
    classes = data.classes
    labels = {"before": "unpruned model", "raw": "pruned model before BatchNorm recalibration",
              "recalibrated": "pruned model after BatchNorm recalibration"}
    images = ws.config.prune.recalibrate_images
    parts = 4 if images else 2  # the measures and the recalibration share the progress in turn
    reports = {"before": validation_accuracy(ws, original, labels["before"], progress=part_progress(progress, 0, parts),
                                             cancel=cancel),
               "raw": validation_accuracy(ws, masked, labels["raw"], progress=part_progress(progress, 1, parts),
                                          cancel=cancel)}
    recalibration = None
    if images:
        recalibration = recalibrate_batchnorm(
            masked, data.train, ws.normalization, n_images=images, batch_size=ws.config.evaluate.batch_size,
            seed=ws.config.run.seed, device=ws.device, progress=part_progress(progress, 2, parts, "recalibration"),
            cancel=cancel,
        )
        if recalibration.layers:
            reports["recalibrated"] = validation_accuracy(ws, masked, labels["recalibrated"],
                                                          progress=part_progress(progress, 3, parts), cancel=cancel)
    before = reports["before"].clean_acc
    warnings = [
        warning for key, r in reports.items()
        for warning in collapse_warnings(labels[key], r.clean_acc, r.clean_predicted, classes,
                                         reference=None if key == "before" else (labels["before"], before))
    ]
    after = reports.get("recalibrated")
    check = AccuracyCheck("val", reports["raw"].n_examples, before, reports["raw"].clean_acc,
                          None if after is None else after.clean_acc, warnings)
    return check, recalibration


# The phases of a prune in the order they run (the report's `prune.step_seconds` keys):
# recalibrate also measures validation accuracy before and after (none of it without data),
# rebuild makes the grouped and deployed forms, check is their equivalence to the masked model.
PRUNE_PHASES: tuple[str, ...] = ("plan", "recalibrate", "rebuild", "check", "latency")


def prune(
    ws: Workspace,
    *,
    model: nn.Module | None = None,
    out_dir: Path | None = None,
    resume: bool = False,
    on_event: Callable[[TraceEvent], None] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PruneOutcome:
    """Prune `model` (default: the opened one) with the configured method — planned once, trained
    with masks (in-train pruning), or on AdaSAP's progressive schedule after a warmup — then
    recalibrate the pruned model's BatchNorm statistics (measuring validation accuracy before and
    after), rebuild it in grouped and deployed form, check both against the masked dense model on
    a real test batch, and time the deployed model against the opened one in interleaved rounds.
    Progress names each of `PRUNE_PHASES` with its own fraction and time (`Phases`; training to
    prune is the plan phase); `step_seconds` are those times. Methods that train keep `last.pt` in
    `out_dir` and `resume` from it. Under torchrun rank 0 plans one-shot methods and the others
    receive its plan; methods that train run on every process. `ws.model` and `model` are read,
    never moved or changed, so other jobs may use them meanwhile."""
    config = ws.config
    source = ws.model if model is None else model
    check_prune_input(ws)
    phases = Phases(PRUNE_PHASES, progress)
    details: dict[str, Any] = {}
    effective = target = None
    snapshots: SnapshotSource | None = None  # opened where the plan is made, named in the report by rank 0
    events: list[TraceEvent] = []
    with phases.run("plan") as report:
        if config.prune.method == "itp":
            itp = run_itp(source, ws.require_data("in-train pruning"), ws.normalization, config.prune, config.itp,
                          config.finetune, ws.input_shape, out_dir, resume=resume,
                          arch=ws.checkpoint.arch.to_dict(), progress=report, cancel=cancel, ctx=ws.ctx)
            source, plan, events = itp.model, itp.plan, itp.events
            details, effective, target = {"itp": itp_section(itp)}, itp.effective_macs, itp_target_macs(itp)
        elif progressive(config):
            snapshots = load_ticket_snapshots(ws) if needs_snapshots(config) else None
            phase = prune_progressively(ws, source, snapshots, out_dir, resume=resume, progress=report,
                                        cancel=cancel)
            assert phase.plan is not None
            source, plan, events = phase.model, phase.plan, phase.events
            details = {"progressive": {
                "steps": max((e.steps for e in events if e.kind == "progressive_prune"), default=0),
                "pruning_epochs": config.warmup.pruning_epochs,
                "prune_frequency": config.warmup.prune_frequency,
                "training": phase.training.to_dict()}}
        else:
            planned: PrunePlan | None = None
            if ws.ctx.is_main:
                snapshots = load_ticket_snapshots(ws) if needs_snapshots(config) else None
                try:
                    planned = method_plan(ws, source, config.prune.rate, snapshots=snapshots, on_event=on_event,
                                          progress=report, cancel=cancel)
                except Cancelled:
                    pass  # the others learn it from the broadcast: no plan
            planned = ws.ctx.broadcast_object(planned)
            if planned is None:
                raise Cancelled("pruning cancelled")
            plan = planned
        release_free_memory()  # the search's temporaries, before the model copies below
        ws.ctx.check_cancel(cancel)
    if on_event is not None:
        for event in events:
            on_event(event)
    if plan.method == "l1-filter":
        target = int(plan.params["target_macs"])
    outcome = deployed_outcome(ws, source, plan, phases, cancel=cancel)
    outcome.details, outcome.target_macs = details, target
    outcome.effective_macs = outcome.cost_after.macs if effective is None else effective
    if snapshots is not None:
        outcome.snapshots = {"source": config.model.snapshots, "epochs": sorted(snapshots)}
    if "itp" in details:
        outcome.notes.extend(itp_warnings(details["itp"]))
    return outcome


def prune_progressively(ws: Workspace, model: nn.Module, snapshots: SnapshotSource | None,
                        out_dir: Path | None, *, resume: bool = False, progress: ProgressCallback | None = None,
                        cancel: threading.Event | None = None) -> PhaseOutcome:
    """AdaSAP phase 2: adaptive steps while the configured method re-plans on the exponential
    schedule (SPEC §9); the last step's plan is the result."""
    config = ws.config

    def replan(current: nn.Module, rate: float, final: bool) -> tuple[PrunePlan, list[TraceEvent]]:
        events: list[TraceEvent] = []
        plan = method_plan(ws, current, rate, snapshots=snapshots, on_event=events.append if final else None,
                           cancel=cancel)
        return plan, events

    return run_progressive(model, ws.require_data("progressive pruning"), ws.normalization, config.warmup,
                           config.finetune, config.prune.rate, config.prune.method, replan, out_dir, resume=resume,
                           progress=progress, cancel=cancel, ctx=ws.ctx)


def deployed_outcome(ws: Workspace, source: nn.Module, plan: PrunePlan, phases: Phases, *,
                     cancel: threading.Event | None = None) -> PruneOutcome:
    """`source` pruned by `plan`: its BatchNorm statistics recalibrated (with validation accuracy
    of the opened model, and of the pruned one before and after), rebuilt in grouped and deployed
    form, checked against its masked dense form, with costs and latency against the opened model.
    `phases` has run the plan phase and runs the others."""
    config = ws.config
    notes: list[str] = []
    accuracy = recalibration = None
    with phases.run("recalibrate") as report:
        original = copy.deepcopy(source).to(ws.device).eval()
        # `original` is this call's own copy, so the reference may share its unpruned tensors.
        masked = masked_dense(original, plan, share_unplanned=True)
        # The unpruned model the pruned one is measured against: the opened one (a method that
        # trains to prune changed `source`'s weights).
        reference = original if source is ws.model else copy.deepcopy(ws.model).to(ws.device).eval()
        if ws.data is None:
            notes.append(NO_DATA)
        else:
            # Under torchrun a cancel is acted on only where the ranks agree on it (check_cancel below).
            local_cancel = None if ws.ctx.distributed else cancel
            accuracy, recalibration = recalibrate_and_check(ws, reference, masked, progress=report,
                                                            cancel=local_cancel)
            if not config.prune.recalibrate_images:
                notes.append("BatchNorm recalibration is off (prune.recalibrate_images = 0)")
            elif recalibration is not None and recalibration.note:
                notes.append(recalibration.note)
        ws.ctx.check_cancel(cancel)
    if ws.data is None:
        phases.skip("recalibrate", "no data: no accuracy measured, no BatchNorm recalibrated")
    with phases.run("rebuild"):
        batch = ws.example_batch().to(ws.device)
        size = config.deploy.latency_batch
        latency_input = batch[:size].repeat((size + len(batch) - 1) // len(batch), 1, 1, 1)[:size]
        grouped = apply_plan(original, plan, form="grouped")
        deployed = (
            grouped if config.deploy.form == "grouped"
            else apply_plan(original, plan, form=config.deploy.form, example_input=latency_input)
        )
        kept_filters = {f.name: f.kept for f in plan.filters}
        for model in (grouped, deployed):
            copy_batchnorm_statistics(masked, model, channels=filter_batchnorm_channels(original, kept_filters))
        cost_after = count_cost(grouped, ws.input_shape)
        ws.ctx.check_cancel(cancel)
    with phases.run("check"):
        error = max(equivalence_error(grouped, masked, batch), equivalence_error(deployed, masked, batch))
        del masked
        ws.ctx.check_cancel(cancel)
    with phases.run("latency"):
        timing = interleaved_latency({"original": reference, "pruned": deployed}, latency_input, device=ws.device)
    steps = {name: state.seconds for name, state in phases.states.items()}
    return PruneOutcome(
        plan=plan,
        model=grouped,
        deployed=deployed,
        cost_before=ws.cost,
        cost_after=cost_after,
        equivalence_max_abs_err=error,
        equivalence_input=ws.example_source,
        seconds=steps["plan"],
        step_seconds=steps,
        latency=timing,
        latency_batch=size,
        deploy=deploy_summary(deployed),
        accuracy=accuracy,
        recalibration=recalibration,
        notes=notes,
    )


def itp_target_macs(itp: ItpOutcome) -> int | None:
    """The whole-model MACs ψ* means (its masked layers at `1 − rate` of their MACs); None when
    the hardware loss is on params."""
    if itp.plan.params.get("itp_cost") != "macs":
        return None
    masked = sum(c.macs for c in itp.setup.costs.values())
    return round(itp.setup.whole_macs - masked + itp.setup.target * masked)


# What SPEC §8 and §9 leave open and the workbench chose, named in the report.
ITP_CHOICES: dict[str, str] = {
    "masked_layers": "SPEC §1's eligible convs; the stem and the classifier stay unmasked",
    "optimiser": "the fine-tune table's (SPEC §7: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 64, ×0.1 at "
                 "1/2 and 3/4 of itp.epochs), not the paper's from-scratch recipe (lr 0.1, batch 128, weight decay 1e-4)",
    "grouping": "grouped-kernel filter groups from smoothness or magnitude snaking, random, or contiguous (from "
                "scratch); TMI clustering is not offered (it needs training snapshots of the ticket window)",
    "training_step": "one SGD step on weights and masks on the adversarial images only (clean with adversarial = false)",
    "hardware_step": "autograd of b·L_HW through the straight-through masks, a plain step at the current lr, "
                     "every prune_step iterations inside the window, none once the target is met",
    "mask_regularisation": "the optimiser's weight decay on masks and weights alike (finetune.weight_decay)",
    "freeze": "grouped-kernel: S = round(mean kept per group), every group its top-S by M; channel: at least one "
              "channel; then, outside itp.tolerance, completion to the target by M",
    "deployment": "grouped-kernel masks as GKP grouped convs; channel masks as one-group convs gathering the kept "
                  "input channels (a producing conv keeps computing the outputs nobody reads); kernel and weight "
                  "masks as zeroed weights",
}
WARMUP_CHOICES: dict[str, str] = {
    "partitions": "the output filters of every conv and linear weight; BatchNorm and bias parameters unperturbed",
    "importance_range": "s_min and s_max per layer, at every step",
    "perturbation": "ρ_i·T_w²g_i/‖T_w g_i‖ with T_w = |w| + 0.01 (SPEC §9: the paper's Eq. 5 denominator is a typo)",
    "optimiser": "the fine-tune table's (SPEC §7 CIFAR settings, not the paper's ImageNet recipe) at a constant lr",
    "progressive_pruning": "every prune_frequency iterations the method re-plans on the current weights at "
                           "1 − (1 − rate)^(r/R) and the weights it drops stay zero; the last plan is the result",
}


def itp_section(itp: ItpOutcome) -> dict[str, Any]:
    """What in-train pruning adds to the report's prune section."""
    freeze = itp.freeze
    return {
        "granularity": itp.plan.params["granularity"],
        "cost": itp.plan.params["itp_cost"],
        "target_complexity": itp.setup.target,
        "learned_complexity": freeze.learned,
        "achieved_complexity": freeze.achieved,
        "relative_error": freeze.relative_error,
        "target_met": freeze.target_met,
        "completed_off": freeze.completed_off,
        "completed_on": freeze.completed_on,
        "effective_params": itp.effective_params,
        "masked_layers": len(itp.setup.names),
        "choices": ITP_CHOICES,
        "training": itp.training.to_dict(),
    }


def itp_warnings(section: dict[str, Any]) -> list[str]:
    """A warning when in-train pruning could not reach its target within the tolerance (the
    model is still valid and kept)."""
    if section["target_met"]:
        return []
    return [f"in-train pruning reached complexity {section['achieved_complexity']:.4f}, "
            f"{100 * section['relative_error']:+.2f}% from the target {section['target_complexity']:.4f} "
            "(outside the tolerance); the model is kept as it is"]


def warmup(
    ws: Workspace,
    out_dir: Path | None,
    *,
    model: nn.Module | None = None,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PhaseOutcome:
    """AdaSAP's warmup (SPEC §9) on a copy of `model` (default: the opened one)."""
    return run_warmup(ws.model if model is None else model, ws.require_data("the warmup"), ws.normalization,
                      ws.config.warmup, ws.config.finetune, out_dir, resume=resume, progress=progress, cancel=cancel,
                      ctx=ws.ctx)


def warmup_section(ws: Workspace, outcome: PhaseOutcome) -> dict[str, Any]:
    """The `warmup` section of the report."""
    w = ws.config.warmup
    return {
        "epochs": w.epochs, "rho_min": w.rho_min, "rho_max": w.rho_max, "importance": w.importance,
        "lr": ws.config.finetune.lr, "schedule": "constant", "choices": WARMUP_CHOICES, **outcome.training.to_dict(),
    }


def measure_sharpness(ws: Workspace, model: nn.Module, when: str, *, cancel: threading.Event | None = None,
                      on_event: Callable[[TraceEvent], None] | None = None) -> Sharpness:
    """The sharpness of `model` at a point of the run (SPEC §9) with the configured estimator."""
    s = ws.config.sharpness
    images = ws.require_data("measuring sharpness").train
    result = sharpness(model, ws.normalization, images, rho=s.rho, steps=s.steps, images=s.images, device=ws.device,
                       cancel=cancel)
    if on_event is not None:
        on_event(SharpnessMeasured("", when, result.value, result.loss, result.rho, result.steps, result.images))
    return result


def save_model(ws: Workspace, path: Path, model: nn.Module, plan: PrunePlan | None, metadata: dict[str, Any]) -> None:
    """Write a workbench checkpoint that reopens with no flags (arch, normalisation, plan, and
    the data spec it was made with, when there was data)."""
    data = {DATA_KEY: ws.config.data.spec} if ws.data is not None else {}
    save_checkpoint(path, model, ws.checkpoint.arch, ws.normalization, plan=plan, metadata={**metadata, **data})


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
        model, ws.require_data("fine-tuning"), ws.normalization, ws.config.finetune_settings(), out_dir,
        resume=resume,
        save_model=lambda path, m, meta: save_model(ws, path, m, plan, meta),
        progress=progress, cancel=cancel, ctx=ws.ctx,
    )


@dataclass
class Evaluation:
    """Clean and robust accuracy of one model, with the optional probes; `warnings` flag a
    collapsed model and failed sanity checks of the attacks in words."""

    robustness: RobustnessReport
    frequency: FrequencyReport | None
    corruption: CorruptionReport | None
    warnings: list[str] = field(default_factory=list)

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
            "relative_robustness": None if self.corruption is None else self.corruption.robustness_ratio,
            "warnings": list(self.warnings),
        }


EVALUATE_PHASES: tuple[str, ...] = ("attacks", "frequency", "corruption")


def evaluate(
    ws: Workspace,
    model: nn.Module,
    *,
    label: str = "model",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    on_result: Callable[[Evaluation], None] | None = None,
) -> Evaluation:
    """Attack suite and probes on the test split, on the same examples, run on the dense
    equivalent of a pruned model; `label` names the model in warnings. Progress names each of
    `EVALUATE_PHASES` (`Phases`; a probe that is off is skipped); `on_result` receives the
    evaluation so far after the clean pass, each attack and each probe. Under torchrun the
    attacks and probes are sharded over the processes."""
    cfg = ws.config.evaluate
    data = ws.require_data("evaluation")
    model = dense_equivalent(model)
    phases = Phases(EVALUATE_PHASES, progress)
    common = dict(device=str(ws.device), batch_size=cfg.batch_size, cancel=cancel)
    limit = cfg.max_examples or None
    frequency: FrequencyReport | None = None
    corruption: CorruptionReport | None = None

    def so_far(robustness: RobustnessReport) -> Evaluation:
        warnings = collapse_warnings(label, robustness.clean_acc, robustness.clean_predicted, data.classes)
        return Evaluation(robustness, frequency, corruption, warnings + [f"{label}: {w}" for w in robustness.warnings])

    def deliver(robustness: RobustnessReport) -> None:
        if on_result is not None:
            on_result(so_far(robustness))

    with phases.run("attacks") as report:
        robustness = evaluate_sharded(
            model, ws.normalization, data.test, [parse_attack(a) for a in cfg.attacks], ctx=ws.ctx,
            max_examples=limit, eps_space=cfg.eps_space, seed=ws.config.run.seed, progress=report,
            on_report=deliver, **common,
        )
    for name, wanted in (("frequency", cfg.frequency), ("corruption", cfg.corruption)):
        if not wanted:
            phases.skip(name, "off")
            continue
        with phases.run(name) as report:
            if name == "frequency":
                frequency = frequency_sharded(model, ws.normalization, data.test, thresholds=tuple(cfg.thresholds),
                                              ctx=ws.ctx, max_examples=limit, progress=report, **common)
            else:
                corruption = corruption_sharded(model, ws.normalization, data.test, severities=tuple(cfg.severities),
                                                ctx=ws.ctx, max_examples=limit, progress=report, **common)
        deliver(robustness)
    return so_far(robustness)


def needs_snapshots(config: RunConfig) -> bool:
    """Whether the configured grouping is TMI-driven and so needs training snapshots."""
    return config.prune.method in ("sr-gkp", "tmi-gkp") and config.prune.resolved_grouping == "tmi"


def check_evaluation_config(config: RunConfig) -> None:
    """Parse every attack now, so a typo fails before any work or output."""
    for text in config.evaluate.attacks:
        parse_attack(text)


def plan_of(checkpoint: LoadedCheckpoint) -> PrunePlan | None:
    """The plan stored in a pruned workbench checkpoint."""
    return None if checkpoint.plan is None else PrunePlan.from_dict(checkpoint.plan)


def _plan_layers(plan: PrunePlan) -> list[dict[str, Any]]:
    """Per pruned layer what it keeps: grouped kernels, masked weights, or filters."""
    rows: list[dict[str, Any]] = [
        {"name": l.name, "in_channels": l.in_channels, "out_channels": l.out_channels,
         "kept": l.kept, "achieved_ratio": l.achieved_ratio}
        for l in plan.layers
    ]
    rows += [{"name": m.name, "granularity": m.granularity, "kept": m.kept, "achieved_ratio": m.pruned_share}
             for m in plan.masks]
    rows += [{"name": f.name, "out_channels": f.out_channels, "kept": len(f.kept),
              "achieved_ratio": 1 - len(f.kept) / f.out_channels} for f in plan.filters]
    return rows


def prune_sections(outcome: PruneOutcome) -> dict[str, Any]:
    """The `prune` and `deploy` sections of the report. `macs_after` counts the MACs of kept
    weights (`macs_deployed`, what the deployed model's convs compute, is larger for zeroed-weight
    masks and for channel masks whose producers keep their outputs)."""
    plan, before, after = outcome.plan, outcome.cost_before, outcome.cost_after
    macs_after = after.macs if outcome.effective_macs is None else outcome.effective_macs
    recalibration = outcome.recalibration
    original, pruned = outcome.latency["original"], outcome.latency["pruned"]
    return {
        "prune": {
            "method": plan.method,
            "granularity": plan.params.get("granularity"),
            "grouping": plan.params.get("grouping"),
            "selection": plan.params.get("selection"),
            "rate": plan.params.get("rate"),
            "groups": plan.params.get("groups"),
            "params": plan.params,
            "params_before": before.params,
            "params_after": after.params,
            "params_reduction": 1 - after.params / before.params,
            "macs_before": before.macs,
            "target_macs": outcome.target_macs,
            "macs_after": macs_after,
            "macs_deployed": after.macs,
            "macs_reduction": 1 - macs_after / before.macs,
            "seconds": outcome.seconds,
            "step_seconds": outcome.step_seconds,
            "equivalence_max_abs_err": outcome.equivalence_max_abs_err,
            "equivalence_input": outcome.equivalence_input,
            "accuracy": None if outcome.accuracy is None else outcome.accuracy.to_dict(),
            "recalibration": None if recalibration is None else recalibration.to_dict(),
            "snapshots": outcome.snapshots,
            "warnings": outcome.warnings,
            "layers": _plan_layers(plan),
            "layers_skipped": [{"name": s.name, "reason": s.reason} for s in plan.skipped],
            **outcome.details,
        },
        "deploy": {
            "form": outcome.deploy.get("form"),
            "batch": outcome.latency_batch,
            "latency_ms": {"original": original.median_ms, "pruned": pruned.median_ms, "speedup": outcome.speedup},
            "latency": {"original": original.to_dict(), "pruned": pruned.to_dict(), "verdict": outcome.latency_verdict},
            "counts": outcome.deploy.get("counts"),
            "layers": outcome.deploy.get("layers"),
        },
    }


def finetune_section(ws: Workspace, result: FinetuneResult) -> dict[str, Any]:
    """The `finetune` section of the report: the settings that matter most, then the result."""
    config = ws.config.finetune_settings()
    images = sum(r.images_per_second * r.seconds for r in result.history)
    train_seconds = sum(r.seconds for r in result.history)
    return {
        "epochs": config.epochs,
        "mode": config.mode,
        "rho": config.resolved_rho() if config.mode in ("sam", "asam") else None,
        "sam_partition": config.sam_partition if config.mode in ("sam", "asam") else None,
        "adasap_robustness": ws.config.adasap and ws.config.warmup.robust_finetune,
        "lr": config.lr,
        "schedule": config.schedule,
        "batch_size": config.batch_size,
        "images_per_second": images / train_seconds if train_seconds else 0.0,
        **result.to_dict(),
    }
