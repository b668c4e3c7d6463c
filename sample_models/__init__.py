"""The bundled sample: a CIFAR-style ResNet-20 trained on scikit-learn's digits by
`train_sample.py` in this folder, with its compact training snapshots for TMI-GKP. The front
ends open it when no checkpoint is given; the engine never refers to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SAMPLE_CHECKPOINT = HERE / "resnet20_digits.pt"
SAMPLE_SNAPSHOTS = HERE / "resnet20_digits_snapshots.npz"
SAMPLE_DATA = "digits"


def use_sample_when_unset(config: Any) -> None:
    """Point a run config with no checkpoint at the bundled sample and, unless snapshots are
    set, at the sample's own ticket-window snapshots. When the checkpoint is the sample (given or
    filled in) and no data is set, use the data it was trained on: the only model whose data the
    workbench knows without being told."""
    if not config.model.checkpoint:
        config.model.checkpoint = str(SAMPLE_CHECKPOINT)
        if not config.model.snapshots:
            config.model.snapshots = str(SAMPLE_SNAPSHOTS)
    if is_sample(config.model.checkpoint) and not config.data.spec:
        config.data.spec = SAMPLE_DATA


def is_sample(path: str | Path) -> bool:
    """Whether `path` is the bundled sample checkpoint."""
    return bool(str(path)) and Path(path).resolve() == SAMPLE_CHECKPOINT
