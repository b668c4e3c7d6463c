"""The one pipeline behind batch mode and the TUI: open a model, prune it, deploy it, fine-tune
it, evaluate it. Each stage is a plain function taking a progress callback and a cancel event."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .common.distributed import DistContext
from .common.errors import Cancelled, ConfigError, DataError, SnapshotError
from .common.memory import release_free_memory
from .common.progress import Phases, ProgressCallback, part_progress
from .config import RunConfig
from .data.datasets import DEFAULT_IMAGE_SIZE, DataBundle, load_data
from .data.spec import SPEC_HELP, parse_data_spec
from .formats.checkpoints import WORKBENCH_FORMAT, LoadedCheckpoint, load_checkpoint, save_checkpoint
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
from .gkp.traces import TraceEvent
from .models.batchnorm import Recalibration, copy_batchnorm_statistics, recalibrate_batchnorm
from .models.latency import RoundTimes, interleaved_latency, latency_verdict
from .models.metrics import ModelCost, count_cost
from .models.normalization import (
    UNKNOWN_NORMALIZATION,
    Normalization,
    parse_normalization,
)
from .models.normalize_layer import Normalize
from .robustness.attacks import RobustnessReport, evaluate_robustness, parse_attack
from .robustness.collapse import collapse_warnings
from .robustness.probes import CorruptionReport, FrequencyReport
from .robustness.sharded import corruption_sharded, evaluate_sharded, frequency_sharded
from .training.finetune import FinetuneResult, finetune


DATA_KEY = "data"  # checkpoint metadata: the data spec a workbench checkpoint was made with
NO_DATA = (
    "no data is set, so BatchNorm statistics were not recalibrated and accuracy was not measured "
    "(the pruned model's accuracy may have collapsed); pass --data"
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
            raise ConfigError(f"{what} needs data and none is set: pass --data ({SPEC_HELP})")
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
    needing = [stage for stage in ("finetune", "evaluate") if stage in config.run.stages]
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
            raise DataError(f"{exc} (the data {path.name} records; pass --data to use other data)") from None
        check_fit(checkpoint, data, config.data.spec)
    elif needing and load:
        stages = f"the {' and '.join(needing)} stage{'s need' if len(needing) > 1 else ' needs'}"
        raise ConfigError(
            f"{stages} data and none is set: pass --data ({SPEC_HELP}); "
            "the workbench does not guess which dataset a model was trained on"
        )
    if override is not None:
        norm, source = override, "set by the user"
    elif checkpoint.normalization is not None:
        norm, source = checkpoint.normalization, "stored in the checkpoint"
    elif needing:
        raise ConfigError(
            f"{checkpoint.path.name} does not record its input normalisation; pass --normalize "
            "(cifar10, imagenet, none or MEAN,STD) as the model was trained"
        )
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
            "use the data the model was trained on (--data, or the data field)"
        )
    channels = model_channels(checkpoint)
    if stored is not None and stored != channels:
        raise ConfigError(
            f"{spec} images have {stored} channel{'s' if stored != 1 else ''} "
            f"but the model takes {channels}: use the data the model was trained on (--data, or the data field)"
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
    data; `notes` say what was skipped and why; `snapshots` names the TMI tickets used."""

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

    @property
    def latency_verdict(self) -> str:
        """faster, slower or within noise (the pruned model against the original); always within
        noise when no pruned layer is deployed grouped, since the deployed model then runs the
        original's convolutions with zeros in place of the pruned kernels."""
        if not self.deploy.get("counts", {}).get("grouped"):
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
    on_event: Callable[[TraceEvent], None] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PruneOutcome:
    """Plan the pruning with the configured method, recalibrate the pruned model's BatchNorm
    statistics (measuring validation accuracy before and after), rebuild it in grouped and
    deployed form, check both against the masked dense model on a real test batch, and time
    the deployed model against the original in interleaved rounds. Progress names each of
    `PRUNE_PHASES` with its own fraction and time (`Phases`); `step_seconds` are those times.
    Under torchrun rank 0 plans and the others receive its plan. `ws.model` is read, never moved
    or changed, so other jobs may use it meanwhile."""
    from .gkp.planner import (
        plan_pruning,  # deferred: it loads scipy (~1 s), which opening a model does not need
    )

    config = ws.config
    check_prunable(ws)
    phases = Phases(PRUNE_PHASES, progress)
    plan: PrunePlan | None = None
    snapshots: SnapshotSource | None = None  # rank 0 alone opens them, and alone writes the report that names them
    with phases.run("plan") as report:
        if ws.ctx.is_main:
            snapshots = load_ticket_snapshots(ws) if needs_snapshots(config) else None
            try:
                plan = plan_pruning(
                    ws.model, config.prune, snapshots=snapshots, arch=ws.checkpoint.arch.to_dict(),
                    on_event=on_event, progress=report, cancel=cancel,
                )
            except Cancelled:
                pass  # the others learn it from the broadcast: no plan
        plan = ws.ctx.broadcast_object(plan)
        if plan is None:
            raise Cancelled("pruning cancelled")
        release_free_memory()  # the search's temporaries, before the model copies below
        ws.ctx.check_cancel(cancel)
    notes: list[str] = []
    accuracy = recalibration = None
    with phases.run("recalibrate") as report:
        original = copy.deepcopy(ws.model).to(ws.device).eval()
        # `original` is this call's own copy, so the reference may share its unpruned tensors.
        masked = masked_dense(original, plan, share_unplanned=True)
        if ws.data is None:
            notes.append(NO_DATA)
        else:
            # Under torchrun a cancel is acted on only where the ranks agree on it (check_cancel below).
            local_cancel = None if ws.ctx.distributed else cancel
            accuracy, recalibration = recalibrate_and_check(ws, original, masked, progress=report, cancel=local_cancel)
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
        for model in (grouped, deployed):
            copy_batchnorm_statistics(masked, model)
        cost_after = count_cost(grouped, ws.input_shape)
        ws.ctx.check_cancel(cancel)
    with phases.run("check"):
        error = max(equivalence_error(grouped, masked, batch), equivalence_error(deployed, masked, batch))
        del masked
        ws.ctx.check_cancel(cancel)
    with phases.run("latency"):
        timing = interleaved_latency({"original": original, "pruned": deployed}, latency_input, device=ws.device)
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
        snapshots=None if snapshots is None else {"source": config.model.snapshots, "epochs": sorted(snapshots)},
        notes=notes,
    )


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
        model, ws.require_data("fine-tuning"), ws.normalization, ws.config.finetune, out_dir, resume=resume,
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
    recalibration = outcome.recalibration
    original, pruned = outcome.latency["original"], outcome.latency["pruned"]
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
            "equivalence_input": outcome.equivalence_input,
            "accuracy": None if outcome.accuracy is None else outcome.accuracy.to_dict(),
            "recalibration": None if recalibration is None else recalibration.to_dict(),
            "snapshots": outcome.snapshots,
            "warnings": outcome.warnings,
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
            "latency_ms": {"original": original.median_ms, "pruned": pruned.median_ms, "speedup": outcome.speedup},
            "latency": {"original": original.to_dict(), "pruned": pruned.to_dict(), "verdict": outcome.latency_verdict},
            "counts": outcome.deploy.get("counts"),
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
