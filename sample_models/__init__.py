"""The bundled sample: a CIFAR-style ResNet-20 trained on scikit-learn's digits by
`train_sample.py` in this folder, with its compact training snapshots for TMI-GKP. The front
ends open it when no checkpoint is given; the engine never refers to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SAMPLE_CHECKPOINT = HERE / "resnet20_digits.pt"
SAMPLE_SNAPSHOTS = HERE / "resnet20_digits_snapshots.npz"


def use_sample_when_unset(config: Any) -> None:
    """Point a run config with no checkpoint at the bundled sample and, unless snapshots are
    set, at the sample's own ticket-window snapshots."""
    if config.model.checkpoint:
        return
    config.model.checkpoint = str(SAMPLE_CHECKPOINT)
    if not config.model.snapshots:
        config.model.snapshots = str(SAMPLE_SNAPSHOTS)


def is_sample(path: str | Path) -> bool:
    """Whether `path` is the bundled sample checkpoint."""
    return bool(str(path)) and Path(path).resolve() == SAMPLE_CHECKPOINT
