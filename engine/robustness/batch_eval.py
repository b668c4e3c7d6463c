"""The one batch-evaluation loop behind robustness evaluation and the probes: iterate a dataset
of ([0, 1] image, label) pairs in fixed order, score each batch, count, report, allow cancel."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..common.errors import DataError
from ..common.progress import Progress, ProgressCallback, check_cancel, report

# Tolerance on the [0, 1] pixel range, so images saved through float rounding still pass.
_RANGE_SLACK = 1e-4

BatchScorer = Callable[[torch.Tensor, torch.Tensor, int], Mapping[str, int]]


@dataclass(frozen=True)
class BatchTotals:
    """What a full pass counted: the examples seen and, per key, the correct predictions."""

    n: int
    correct: dict[str, int]


def example_count(dataset: object, max_examples: int | None) -> int:
    """How many examples a pass will use: the first `max_examples` (all when None)."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError("the dataset must support len() and indexing") from None
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    n = size if max_examples is None else min(size, max_examples)
    if n == 0:
        raise DataError("the dataset is empty")
    return n


def first_image(dataset: object) -> torch.Tensor:
    """The dataset's first image, checked to be a (C, H, W) float tensor."""
    example_count(dataset, None)
    return _image(dataset[0], 0)  # type: ignore[index]


def _image(item: object, index: int) -> torch.Tensor:
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise DataError(f"dataset item {index} is not an (image, label) pair")
    image = item[0]
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or not image.is_floating_point():
        raise DataError(
            f"dataset item {index}: the image must be a float (C, H, W) tensor of [0, 1] pixels"
        )
    return image


def iter_batches(
    dataset: object, n: int, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images, labels) CPU batches over the first `n` examples, in dataset order."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        items = [dataset[i] for i in range(start, stop)]  # type: ignore[index]
        images = torch.stack([_image(item, start + k) for k, item in enumerate(items)])
        low, high = float(images.min()), float(images.max())
        if low < -_RANGE_SLACK or high > 1 + _RANGE_SLACK:
            raise DataError(
                f"dataset images must be [0, 1] pixels (the workbench normalises them itself), "
                f"found values in [{low:.3g}, {high:.3g}]"
            )
        labels = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        yield images.float(), labels


def run_batches(
    dataset: object,
    score: BatchScorer,
    *,
    batch_size: int,
    device: torch.device,
    max_examples: int | None,
    stage: str,
    progress: ProgressCallback | None,
    cancel: threading.Event | None,
) -> BatchTotals:
    """Call `score(images, labels, batch_index)` on every batch (moved to `device`) and sum the
    correct counts it returns; progress after each batch, cancellation checked between them."""
    n = example_count(dataset, max_examples)
    totals: Counter[str] = Counter()
    done = 0
    report(progress, Progress(stage, 0, n))
    for index, (images, labels) in enumerate(iter_batches(dataset, n, batch_size)):
        check_cancel(cancel)
        counts = score(images.to(device), labels.to(device), index)
        totals.update(counts)
        done += len(labels)
        metrics = {key: value / done for key, value in totals.items()}
        report(progress, Progress(stage, done, n, f"{done}/{n} examples", metrics))
    return BatchTotals(done, dict(totals))


def count_correct(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> int:
    """Number of `inputs` that `model` classifies as `labels`."""
    with torch.no_grad():
        return int((model(inputs).argmax(dim=1) == labels).sum())


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys, so each (seed, attack, batch) draw is independent."""
    entropy = [int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


@contextmanager
def evaluation_mode(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Put `model` on `device` in eval mode for the duration, then restore every submodule's
    training flag and the model's original device."""
    modes = [(module, module.training) for module in model.modules()]
    original = next((p.device for p in model.parameters()), None)
    model.to(device).eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        if original is not None:
            model.to(original)


def output_classes(net: nn.Module, inputs: torch.Tensor) -> int:
    """Number of logits `net` gives for `inputs`, with a clear error when it cannot take them."""
    try:
        with torch.no_grad():
            logits = net(inputs)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the model cannot take the dataset's {tuple(inputs.shape[1:])} images ({detail})"
        ) from None
    if logits.dim() != 2:
        raise DataError(
            f"the model must return (batch, classes) logits, got shape {tuple(logits.shape)}"
        )
    return int(logits.shape[1])
