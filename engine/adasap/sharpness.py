"""Sharpness (AdaSAP §4.5 after Foret et al.; estimator chosen in SPEC §9):
`max_{‖ε‖₂≤ρ} L(w+ε) − L(w)` by projected normalised gradient ascent on all trainable
parameters at once, on a fixed set of training images in eval mode. The largest value seen over
the steps (and 0, at ε = 0) is the estimate, so it is never negative."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..common.progress import check_cancel
from ..models.normalization import Normalization
from ..models.normalize_layer import with_normalization

BATCH = 128


@dataclass(frozen=True)
class Sharpness:
    """The estimate, the loss at the unperturbed weights, and how it was measured."""

    value: float
    loss: float
    rho: float
    steps: int
    images: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "loss": self.loss, "rho": self.rho, "steps": self.steps, "images": self.images}


def _batches(dataset: Dataset, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` items (a split is stored shuffled, so they are a random sample)."""
    n = min(count, len(dataset))  # type: ignore[arg-type]
    items = [dataset[i] for i in range(n)]
    images = torch.stack([item[0] for item in items])
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.long)
    return list(zip(images.split(BATCH), labels.split(BATCH)))


def _loss(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    """Mean cross-entropy over the batches."""
    with torch.no_grad():
        total = sum(float(F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum")) for x, y in batches)
    return total / sum(len(y) for _, y in batches)


def _gradient(net: nn.Module, params: list[torch.Tensor], batches: list[tuple[torch.Tensor, torch.Tensor]],
              device: torch.device) -> list[torch.Tensor]:
    """∇ of the mean cross-entropy over the batches, one batch in memory at a time."""
    count = sum(len(y) for _, y in batches)
    grads = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        loss = F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum") / count
        for total, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                total.add_(g)
    return grads


def sharpness(
    model: nn.Module,
    normalization: Normalization,
    dataset: Dataset,
    *,
    rho: float = 0.05,
    steps: int = 5,
    images: int = 512,
    device: str | torch.device = "cpu",
    cancel: threading.Event | None = None,
) -> Sharpness:
    """Sharpness of `model` (which takes normalised input) on the first `images` items of
    `dataset`; the model's weights and mode are restored afterwards."""
    dev = torch.device(device)
    batches = _batches(dataset, images)
    net = with_normalization(model, normalization.for_channels(batches[0][0].shape[1])).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    originals = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    epsilon = [torch.zeros_like(p) for p in params]
    try:
        base = _loss(net, batches, dev)
        best = 0.0
        for _ in range(steps):
            check_cancel(cancel)
            grads = _gradient(net, params, batches, dev)
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
                break
            with torch.no_grad():
                epsilon = [e + rho * g / norm for e, g in zip(epsilon, grads)]
                size = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in epsilon]))
                if float(size) > rho:
                    epsilon = [e * (rho / size) for e in epsilon]
                for p, start, e in zip(params, originals, epsilon):
                    p.copy_(start + e)
            best = max(best, _loss(net, batches, dev) - base)
    finally:
        with torch.no_grad():
            for p, start in zip(params, originals):
                p.copy_(start)
        model.train(was_training)
    return Sharpness(best, base, rho, steps, sum(len(y) for _, y in batches))
