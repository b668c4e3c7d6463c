"""BatchNorm recalibration (SPEC §7): after pruning, every BatchNorm after a pruned conv sees
inputs whose statistics no longer match its stored running mean and variance. Re-estimating them
from training images, with no weight change, recovers most of the accuracy pruning seemed to
lose, and is what pruning criteria are compared by before fine-tuning."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset

from ..common.errors import ConfigError, DataError
from ..common.progress import Progress, ProgressCallback, check_cancel, report
from .normalization import Normalization
from .normalize_layer import Normalize

NO_BATCHNORM = "the model has no BatchNorm layers with running statistics: nothing to recalibrate"


@dataclass(frozen=True)
class Recalibration:
    """What a recalibration did: BatchNorm layers re-estimated, training images used (drawn by
    `seed`), batch size and time; `note` says why nothing was done, when nothing was."""

    layers: int
    images: int
    batch_size: int
    seed: int
    seconds: float
    note: str = ""

    def to_dict(self) -> dict[str, int | float | str]:
        return asdict(self)


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """The BatchNorm layers of `model` that keep running statistics, by name."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, _BatchNorm) and module.track_running_stats and module.running_mean is not None]


def recalibrate_batchnorm(
    model: nn.Module,
    images: Dataset,
    normalization: Normalization,
    *,
    n_images: int = 1024,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> Recalibration:
    """In place: replace the running mean and variance of every BatchNorm of `model` (which
    takes normalised input) by their cumulative average (`momentum = None`) over `n_images`
    ([0, 1] image, label) items of `images`, drawn without replacement by `seed`. Only the
    BatchNorm layers run in train mode; no weight changes, every other module stays as it was,
    and each layer's momentum and train/eval flag are restored after."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ConfigError(f"recalibration needs at least one image, got {n_images!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"recalibration batch size must be at least 1, got {batch_size!r}")
    norms = batchnorm_layers(model)
    if not norms:
        return Recalibration(0, 0, batch_size, seed, 0.0, NO_BATCHNORM)
    total = len(images)  # type: ignore[arg-type]
    if total == 0:
        raise DataError("there are no training images to recalibrate BatchNorm statistics on")
    n = min(n_images, total)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()
    param = next(model.parameters(), None)
    target = device or (param.device if param is not None else torch.device("cpu"))
    normalize = Normalize(normalization).to(target)
    modes = [(module, module.training) for module in model.modules()]
    momenta = [(module, module.momentum) for _, module in norms]
    started = time.perf_counter()
    report(progress, Progress("recalibrate", 0, n, f"BatchNorm statistics of {len(norms)} layers"))
    try:
        model.eval()
        for _, module in norms:
            module.reset_running_stats()
            module.momentum = None
            module.train()
        with torch.no_grad():
            for start in range(0, n, batch_size):
                check_cancel(cancel)
                batch = torch.stack([images[i][0] for i in chosen[start:start + batch_size]]).to(target)  # type: ignore[index]
                model(normalize(batch))
                done = min(n, start + batch_size)
                report(progress, Progress("recalibrate", done, n, f"{done}/{n} training images"))
    finally:
        for module, training in modes:
            module.training = training
        for module, momentum in momenta:
            module.momentum = momentum
    return Recalibration(len(norms), n, batch_size, seed, time.perf_counter() - started)


def copy_batchnorm_statistics(source: nn.Module, target: nn.Module,
                              channels: Mapping[str, Sequence[int]] | None = None) -> int:
    """Copy the running statistics of every BatchNorm of `source` into the BatchNorm of the same
    name in `target` (another form of the same model; `channels` names the channels of `source`'s
    layers that `target` kept, where filter pruning narrowed them); returns how many layers were
    copied."""
    theirs = dict(batchnorm_layers(target))
    kept = channels or {}
    copied = 0
    with torch.no_grad():
        for name, module in batchnorm_layers(source):
            other = theirs.get(name)
            if other is None:
                continue
            index = list(kept[name]) if name in kept else slice(None)
            other.running_mean.copy_(module.running_mean[index])
            other.running_var.copy_(module.running_var[index])
            other.num_batches_tracked.copy_(module.num_batches_tracked)
            copied += 1
    return copied
