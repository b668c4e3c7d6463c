"""Fine-tuning (SPEC §7): SGD with step or cosine decay and standard, Fast-AT, SAM or ASAM
steps; per-epoch validation keeping the best model per metric; and a `last.pt` after every epoch
from which `resume=True` continues bit-for-bit (same seed, CPU).

Shuffling, augmentation and Fast-AT's random start come from generators seeded by (seed, epoch),
so an epoch's randomness does not depend on what ran before it; under torchrun every global batch
is split across the processes, so N processes see the same batches as one, and BatchNorm
statistics are synchronised across GPUs (SyncBatchNorm; gloo on CPU has none, so there each
process normalises its own share). The processes agree at every step on whether to stop.

On a GPU the loop does not wait on the host: batches come from the device or from pinned memory,
augmentation draws are copied once per epoch, Fast-AT's noise is drawn on the device, and loss
and accuracy are summed there and read only when reported."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from ..common.devices import cudnn_benchmark, device_autocast_dtype, resolve_device
from ..common.distributed import DistContext
from ..common.errors import Cancelled, CheckpointError, ConfigError, DataError
from ..common.fileio import torch_save_atomic
from ..common.progress import Progress, ProgressCallback, report
from ..data.augment import CropFlipDraws
from ..data.batches import TrainBatches
from ..data.datasets import DataBundle
from ..gkp.reconstruct import dense_equivalent
from ..models.normalization import Normalization
from ..models.normalize_layer import with_normalization
from ..robustness.batch_eval import derive_seed
from ..robustness.sharded import evaluate_sharded
from .finetune_config import FinetuneConfig, metric_filename
from .hooks import Steps, TrainingHooks
from .perturbation import neuron_perturbation, neuron_weights

CROP_PAD = 4
STATE_FILE = "last.pt"
STATE_FORMAT = "gkp-finetune-state"
# Version 2 stores the CUDA random state of the device in use only (1: of every visible device).
STATE_VERSION = 2
# On CUDA the running loss is read (a host synchronisation) at most this often for progress.
LOSS_READ_SECONDS = 0.5
# Config keys a resumed run may change: they choose the hardware path, not what is computed.
_RESUME_FREE = ("device", "compile")
# Purposes of the per-epoch generators, mixed into their seeds.
_SHUFFLE, _AUGMENT, _FASTAT = 0, 1, 2

SaveModel = Callable[[Path, nn.Module, dict[str, Any]], None]
EpochHook = Callable[[int, nn.Module], None]


@dataclass
class EpochRecord:
    """One epoch: train loss and accuracy (adversarial examples in fastat mode), the learning
    rate it ran at, and validation accuracy per metric (`benign`, attack labels; empty on
    epochs without evaluation)."""

    epoch: int
    train_loss: float
    train_acc: float
    lr: float
    seconds: float
    images_per_second: float
    val: dict[str, float] = field(default_factory=dict)


@dataclass
class BestRecord:
    """The epoch with the highest validation value of one metric, and its saved model."""

    epoch: int
    value: float
    path: Path | None


@dataclass
class FinetuneResult:
    """What a run did. `completed` is False when it was cancelled: the model then holds the
    weights of the interrupted epoch, while `last_path` holds the last complete one."""

    history: list[EpochRecord]
    best: dict[str, BestRecord]
    last_path: Path | None
    completed: bool
    device: str
    seconds: float
    batchnorm: str = "single process"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (paths as strings), for reports."""
        return {
            "history": [asdict(r) for r in self.history],
            "best": {m: {"epoch": b.epoch, "value": b.value, "path": None if b.path is None else str(b.path)}
                     for m, b in self.best.items()},
            "last_path": None if self.last_path is None else str(self.last_path),
            "completed": self.completed,
            "device": self.device,
            "seconds": self.seconds,
            "batchnorm": self.batchnorm,
        }


def _generator(*keys: int, device: torch.device | None = None) -> torch.Generator:
    return torch.Generator(device=device or "cpu").manual_seed(derive_seed(*keys))


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every global random state as tensors and plain values (loadable with weights_only); of
    CUDA, only the device in use, so a machine with fewer GPUs can resume."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def saved_cuda_state(saved: torch.Tensor | list[torch.Tensor] | None, index: int) -> torch.Tensor | None:
    """The CUDA random state to restore on device `index`: the one saved (version 2), or from a
    version-1 list of every device the saving machine had, that device's entry (the first when
    this machine numbers more devices than it had)."""
    if isinstance(saved, torch.Tensor):
        return saved
    if not saved:
        return None
    return saved[index] if index < len(saved) else saved[0]


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        cuda = saved_cuda_state(state["cuda"], index)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
    saved = state["numpy"]
    np.random.set_state(("MT19937", saved["keys"].numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    saved = state["python"]
    random.setstate((saved["version"], tuple(int(v) for v in saved["state"].tolist()), saved["gauss_next"]))


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu() for key, value in module.state_dict().items()}


class _SyncedBatchNorm:
    """The model's BatchNorm layers swapped for SyncBatchNorm layers sharing their parameters
    and buffers (batch statistics over every process's share of the batch, as one process
    computes them), until `restore` puts the originals back with the trained values."""

    def __init__(self, model: nn.Module) -> None:
        self.swapped: list[tuple[nn.Module, str, _BatchNorm, nn.SyncBatchNorm]] = []
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, _BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                    synced = nn.SyncBatchNorm.convert_sync_batchnorm(child)
                    setattr(parent, name, synced)
                    self.swapped.append((parent, name, child, synced))

    def restore(self) -> None:
        for parent, name, original, synced in reversed(self.swapped):
            original.load_state_dict(synced.state_dict())
            setattr(parent, name, original)
        self.swapped.clear()


def batchnorm_mode(ctx: DistContext, layers: int) -> str:
    """How BatchNorm statistics are computed in this run, for the report."""
    if not ctx.distributed:
        return "single process"
    if layers == 0:
        return "no BatchNorm layers"
    if ctx.device.type == "cuda":
        return f"synchronised over {ctx.world_size} processes (SyncBatchNorm)"
    return (f"per process: SyncBatchNorm needs CUDA, so each of the {ctx.world_size} gloo processes "
            "normalises its own share of every batch")


class _Meter:
    """Summed loss, correct count and example count of an epoch, kept on the device so that
    adding a step's values never waits for the step to finish."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, count: int) -> None:
        self.loss += loss.double()
        self.correct += correct
        self.count += count


@contextmanager
def _running_stats_frozen(model: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics left unchanged, for SAM's second pass over the same batch."""
    norms = [(m, m.momentum) for m in model.modules() if isinstance(m, _BatchNorm)]
    for module, _ in norms:
        module.momentum = 0.0
    try:
        yield
    finally:
        for module, momentum in norms:
            module.momentum = momentum


def fgsm_random_start(
    loss_of: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    eps: float,
    alpha: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Fast-AT's adversarial batch (Wong et al., "Fast is better than free"): a uniform random
    start in the ε-ball (drawn on the generator's device), one signed-gradient step of `alpha` on
    `loss_of`, clamped to the ball and to [0, 1] pixels."""
    noise = (torch.rand(x.shape, generator=generator, device=generator.device) * 2 - 1) * eps
    delta = ((x + noise.to(x.device)).clamp(0, 1) - x).requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(x + delta), delta)
    delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()


def sharpness_perturbation(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], rho: float, adaptive: bool
) -> list[torch.Tensor]:
    """SAM's weight perturbation ρ·g/‖g‖ for each (weight, gradient) pair, or ASAM's
    ρ·|w|²g/‖|w|g‖ (Kwon et al.); zero when the gradient is zero or not finite (the step is then
    a plain one), decided on the device without reading the norm. Any uniform scale of the
    gradients (a loss scaler's) cancels out."""
    scaled = [w.abs() * g if adaptive else g for w, g in pairs]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
    usable = torch.isfinite(norm) & (norm > 0)
    return [torch.where(usable, rho * (w.abs() * s if adaptive else s) / norm, torch.zeros_like(s))
            for (w, _), s in zip(pairs, scaled)]


class _Run:
    """One fine-tuning run's model, optimiser, schedule, bookkeeping and checkpoint files."""

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        norm: Normalization,
        config: FinetuneConfig,
        out_dir: Path | None,
        ctx: DistContext,
        save_model: SaveModel | None,
        on_epoch_end: EpochHook | None,
        progress: ProgressCallback | None,
        cancel: threading.Event | None,
        hooks: TrainingHooks | None = None,
    ) -> None:
        self.hooks = hooks or TrainingHooks()
        self.stage = self.hooks.stage
        self.model, self.data, self.norm, self.config, self.out_dir, self.ctx = model, data, norm, config, out_dir, ctx
        self.save_model, self.on_epoch_end, self.cancel = save_model, on_epoch_end, cancel
        self.progress = progress if ctx.is_main else None
        self.specs = config.attack_specs()
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters to fine-tune")
        device = ctx.device
        cuda = device.type == "cuda"
        self.channels_last = cuda and config.channels_last
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        core: nn.Module = with_normalization(model, norm).to(device)
        self.optimizer = torch.optim.SGD(
            self.params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        self.scheduler: torch.optim.lr_scheduler.LRScheduler = (
            torch.optim.lr_scheduler.MultiStepLR(self.optimizer, config.resolved_milestones(), config.gamma)
            if config.schedule == "step"
            else torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.epochs)
        )
        self.amp_dtype = device_autocast_dtype(device) if config.amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.batches = TrainBatches(data.train, device)
        self.batchnorm = batchnorm_mode(ctx, sum(isinstance(m, _BatchNorm) for m in model.modules()))
        # After every move: the synced layers share the tensors the model holds now.
        self.synced = _SyncedBatchNorm(model) if ctx.distributed and cuda else None
        try:
            if config.compile:
                core = torch.compile(core)  # type: ignore[assignment]
            self.core = core
            self.net = (
                DistributedDataParallel(core, device_ids=[device.index] if cuda else None) if ctx.distributed else core
            )
        except BaseException:
            self.close()
            raise
        self.epoch = 0
        self.history: list[EpochRecord] = []
        self.best: dict[str, BestRecord] = {}
        n = len(data.train)  # type: ignore[arg-type]
        self.steps_per_epoch = len(self._global_batches(torch.arange(n)))
        self.steps_this_run = 0
        self.started = self.loss_read = time.perf_counter()

    def close(self) -> None:
        """Give the model back its own BatchNorm layers and stop the data loader's workers."""
        if self.synced is not None:
            self.synced.restore()
        self.batches.close()

    # ---- one step -------------------------------------------------------------------------

    def _autocast(self) -> Any:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.amp_dtype)

    def _loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy of `net` on the batch, and its logits."""
        with self._autocast():
            logits = net(x)
        return F.cross_entropy(logits.float(), y, reduction="sum"), logits

    def _backward(self, loss: torch.Tensor) -> None:
        self._scaled(loss).backward()

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def _perturbation(self) -> Steps | None:
        """The sharpness pass's weight perturbation: the hooks' (AdaSAP's adaptive step), else
        SAM/ASAM over all parameters at once, or per filter (`sam_partition = "filter"`)."""
        if self.hooks.perturbs:
            return self.hooks.perturbation()
        rho, adaptive = self.config.resolved_rho(), self.config.mode == "asam"
        if self.config.sam_partition == "filter":
            return [(w, neuron_perturbation(w, w.grad, rho, adaptive=adaptive))
                    for _, w in neuron_weights(self.model) if w.grad is not None]
        pairs = [(p, p.grad) for p in self.params if p.grad is not None]
        return [(p, step) for (p, _), step in zip(pairs, sharpness_perturbation(pairs, rho, adaptive))]

    def _sharpness_pass(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> None:
        """SAM's second pass: gradient at the perturbed weights, left for the optimiser step."""
        with torch.no_grad():
            steps = self._perturbation()
            if not steps:
                return
            for p, step in steps:
                p.add_(step)
        self.optimizer.zero_grad(set_to_none=True)
        with _running_stats_frozen(self.model):
            loss, _ = self._loss(self.net, x, y)
            self._backward(loss * scale)
        with torch.no_grad():
            for p, step in steps:
                p.sub_(step)

    def _step(
        self, x: torch.Tensor, y: torch.Tensor, scale: float, attack_rng: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns the batch's summed loss and correct count, on the device.
        Fast-AT's input gradient comes from the unscaled loss: only its sign is used, and a
        scaled fp16 loss could overflow to inf."""
        if attack_rng is not None:
            x = fgsm_random_start(
                lambda adv: self._loss(self.core, adv, y)[0], x,
                self.config.fastat_eps, self.config.fastat_alpha, attack_rng,
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss, logits = self._loss(self.net, x, y)
        self._backward(loss * scale)
        if self.config.mode in ("sam", "asam") or self.hooks.perturbs:
            self._sharpness_pass(x, y, scale)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(dim=1) == y).sum()

    # ---- one epoch ------------------------------------------------------------------------

    def _global_batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """Batches of `order`; under torchrun a last batch smaller than the process count is
        dropped, since every process needs a share."""
        batches = list(order.split(self.config.batch_size))
        if self.ctx.distributed and len(batches[-1]) < self.ctx.world_size:
            batches.pop()
        return batches

    def train_epoch(self, epoch: int) -> EpochRecord:
        """Train epoch `epoch` (0-based) over the train split and step the schedule. Every
        process checks for cancellation before each step, and all stop if any was cancelled."""
        config, ctx = self.config, self.ctx
        n = len(self.data.train)  # type: ignore[arg-type]
        batches = self._global_batches(torch.randperm(n, generator=_generator(config.seed, epoch, _SHUFFLE)))
        draws = (
            CropFlipDraws.draw(n, CROP_PAD, self.data.flip_ok, _generator(config.seed, epoch, _AUGMENT)).to(ctx.device)
            if config.augment else None
        )
        attack_rng = (_generator(config.seed, epoch, _FASTAT, ctx.rank, device=ctx.device)
                      if config.mode == "fastat" else None)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.net.train()
        meter = _Meter(ctx.device)
        started = time.perf_counter()
        local_batches = [batch[ctx.rank :: ctx.world_size] for batch in batches]
        fetched = self.batches.epoch(local_batches)
        for step, batch in enumerate(batches, 1):
            ctx.check_cancel(self.cancel)
            x, y, local = next(fetched)
            if draws is not None:
                x = draws.apply(x, local)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            meter.add(*self._step(x, y, ctx.world_size / len(batch), attack_rng), len(y))
            self.steps_this_run += 1
            self.hooks.after_step(epoch * self.steps_per_epoch + step, lr)
            self._report_step(epoch, step, meter, lr, meter.count * ctx.world_size / (time.perf_counter() - started))
        self.scheduler.step()
        loss_sum, correct, count = self.ctx.all_reduce_sum([float(meter.loss), int(meter.correct), meter.count])
        seconds = time.perf_counter() - started
        return EpochRecord(epoch + 1, loss_sum / count, correct / count, lr, seconds, count / seconds)

    def _report_step(self, epoch: int, step: int, meter: _Meter, lr: float, images_per_second: float) -> None:
        """Progress after a step; the running loss is included on the CPU every step, on CUDA
        every `LOSS_READ_SECONDS` and at the end of an epoch (reading it waits for the GPU)."""
        if self.progress is None:
            return
        done = epoch * self.steps_per_epoch + step
        total = self.config.epochs * self.steps_per_epoch
        now = time.perf_counter()
        eta = (now - self.started) / self.steps_this_run * (total - done)
        metrics: dict[str, Any] = {"epoch": epoch + 1, "step": step, "steps": self.steps_per_epoch, "lr": lr,
                                   "images_per_second": images_per_second, "eta_seconds": eta}
        if (self.ctx.device.type != "cuda" or step == self.steps_per_epoch
                or now - self.loss_read >= LOSS_READ_SECONDS):
            metrics["loss"] = float(meter.loss) / meter.count
            self.loss_read = now
        report(self.progress, Progress(
            self.stage, done, total, f"epoch {epoch + 1}/{self.config.epochs} step {step}/{self.steps_per_epoch}",
            metrics,
        ))

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Validation accuracy, benign and under each tracked attack, sharded over processes (a
        pruned model is measured in its dense equivalent, which infers faster)."""
        report(self.progress, Progress(
            self.stage, epoch * self.steps_per_epoch, self.config.epochs * self.steps_per_epoch,
            f"epoch {epoch}/{self.config.epochs}: evaluating on the validation split", {"epoch": epoch},
        ))
        result = evaluate_sharded(
            dense_equivalent(self.model), self.norm, self.data.val, self.specs, ctx=self.ctx,
            max_examples=self.config.eval_max_examples, device=str(self.ctx.device),
            seed=self.config.seed, cancel=self.cancel,
        )
        return {"benign": result.clean_acc, **{a.label: a.accuracy for a in result.attacks}}

    # ---- bookkeeping and files ----------------------------------------------------------

    def finish_epoch(self, record: EpochRecord) -> None:
        """Record the epoch, save any new best models, then `last.pt` (in that order, so a
        crash between the two is repaired by re-running the epoch)."""
        self.history.append(record)
        for metric, value in record.val.items():
            held = self.best.get(metric)
            if held is not None and value <= held.value:
                continue
            path = None if self.out_dir is None else self.out_dir / f"best_{metric_filename(metric)}.pt"
            if path is not None and self.ctx.is_main:
                self._save_best(path, metric, record)
            self.best[metric] = BestRecord(record.epoch, value, path)
        self.epoch = record.epoch
        if self.out_dir is not None and self.ctx.is_main:
            torch_save_atomic(self._state(), self.out_dir / STATE_FILE)
        report(self.progress, Progress(
            self.stage, self.epoch * self.steps_per_epoch, self.config.epochs * self.steps_per_epoch,
            f"epoch {record.epoch}/{self.config.epochs} done",
            {"epoch": record.epoch, "epoch_done": True, "record": record},
        ))
        if self.on_epoch_end is not None and self.ctx.is_main:
            self.on_epoch_end(record.epoch, self.model)

    def _save_best(self, path: Path, metric: str, record: EpochRecord) -> None:
        metadata = {
            "stage": "finetune", "epoch": record.epoch, "metric": metric, "value": record.val[metric],
            "val": dict(record.val), "dataset": self.data.name, "normalization": self.norm.to_dict(),
            "finetune": self.config.to_dict(),
        }
        if self.save_model is not None:
            self.save_model(path, self.model, metadata)
        else:
            torch_save_atomic({"state_dict": _cpu_state(self.model), "metadata": metadata}, path)

    def _state(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "model": _cpu_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": _rng_state(self.ctx.device),
            "history": [asdict(r) for r in self.history],
            "best": {m: {"epoch": b.epoch, "value": b.value, "file": None if b.path is None else b.path.name}
                     for m, b in self.best.items()},
            "hooks": {"settings": self.hooks.settings(), "state": self.hooks.state_dict()},
        }

    def resume(self) -> None:
        """Continue from `last.pt`: weights, optimiser, schedule, scaler, RNGs and bookkeeping."""
        assert self.out_dir is not None
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"nothing to resume: {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged or foreign files
            raise CheckpointError(f"{path} is not a readable fine-tuning state ({type(exc).__name__})") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{path} is not a fine-tuning state written by the workbench")
        try:
            self._restore(path, state)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is a damaged fine-tuning state ({type(exc).__name__}: {str(exc)[:120]})") from None

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        """`resume` once the file is known to be a fine-tuning state; a damaged one raises any of
        the errors `resume` reports."""
        assert self.out_dir is not None
        saved, current = state["config"], self.config.to_dict()
        changed = [k for k in current if k not in _RESUME_FREE and saved.get(k) != current[k]]
        if changed:
            raise ConfigError(f"cannot resume {path}: the config now differs in {', '.join(changed)}")
        hooks = state.get("hooks", {"settings": {}, "state": {}})
        if hooks["settings"] != self.hooks.settings():
            raise ConfigError(f"cannot resume {path}: it was written by a run of other {self.stage} settings")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError:
            raise CheckpointError(f"{path} holds the weights of a different model") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        _restore_rng(state["rng"], self.ctx.device)
        self.hooks.load_state_dict(hooks["state"])
        self.epoch = int(state["epoch"])
        self.history = [EpochRecord(**r) for r in state["history"]]
        self.best = {
            m: BestRecord(b["epoch"], b["value"], None if b["file"] is None else self.out_dir / b["file"])
            for m, b in state["best"].items()
        }


def finetune(
    model: nn.Module,
    data: DataBundle,
    normalization: Normalization,
    config: FinetuneConfig,
    out_dir: Path | None,
    *,
    resume: bool = False,
    save_model: SaveModel | None = None,
    on_epoch_end: EpochHook | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    ctx: DistContext | None = None,
    hooks: TrainingHooks | None = None,
) -> FinetuneResult:
    """Fine-tune `model` (which takes normalised input) on `data.train`, validating on
    `data.val`. With `out_dir`, every epoch writes `last.pt` and new bests `best_<metric>.pt`
    (through `save_model` when given); `resume` continues from `last.pt`. `on_epoch_end(epoch,
    model)` runs after every complete epoch (for training snapshots); `hooks` add a method's
    own training rules (ITP, AdaSAP). Cancellation stops within one step and returns with
    `completed=False`. Under torchrun (`ctx` from the environment by default) only rank 0 writes
    files and reports progress."""
    config.validate()
    if resume and out_dir is None:
        raise ConfigError("resume needs the output folder of the run to continue")
    ctx = ctx or DistContext.from_env(config.device)
    _check_device(config.device, ctx)
    if config.batch_size % ctx.world_size:
        raise ConfigError(
            f"finetune.batch_size {config.batch_size} must divide evenly over {ctx.world_size} processes"
        )
    if len(data.train) < max(1, ctx.world_size):  # type: ignore[arg-type]
        raise DataError(f"the train split of {data.name} has too few images to train on")
    out = None if out_dir is None else Path(out_dir)
    if out is not None and ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    norm = normalization.for_channels(data.in_channels)
    original = next((p.device for p in model.parameters()), ctx.device)
    started = time.perf_counter()
    run: _Run | None = None
    completed = False
    with ExitStack() as stack:
        if ctx.device.type == "cuda":
            stack.enter_context(cudnn_benchmark())
        try:
            run = _Run(model, data, norm, config, out, ctx, save_model, on_epoch_end, progress, cancel, hooks)
            if resume:
                run.resume()
            else:
                torch.manual_seed(config.seed)
            for epoch in range(run.epoch, config.epochs):
                run.hooks.start_epoch(epoch)
                record = run.train_epoch(epoch)
                if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                    record.val = run.evaluate(epoch + 1)
                run.hooks.end_epoch(record)
                run.finish_epoch(record)
            ctx.barrier()
            completed = True
        except Cancelled:
            pass
        finally:
            if run is not None:
                run.close()
            model.to(original)
            if run is not None and run.channels_last:
                model.to(memory_format=torch.contiguous_format)
    assert run is not None
    last = None if out is None or not (out / STATE_FILE).is_file() else out / STATE_FILE
    return FinetuneResult(run.history, run.best, last, completed, str(ctx.device), time.perf_counter() - started,
                          run.batchnorm)


def _check_device(setting: str, ctx: DistContext) -> None:
    """`finetune.device` other than `auto` must name the device the run computes on (under
    torchrun each process takes its own GPU, so only the kind must match)."""
    if setting.strip().lower() == "auto":
        return
    wanted = resolve_device(setting, "finetune.device")
    index_differs = not ctx.distributed and wanted.index is not None and wanted.index != ctx.device.index
    if wanted.type != ctx.device.type or index_differs:
        raise ConfigError(
            f"finetune.device {setting!r} differs from the device this run computes on ({ctx.device}); "
            "set one device for the whole run"
        )
