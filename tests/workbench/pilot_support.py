"""What the workbench's Pilot tests share: a small test checkpoint, the run config they use and
waiting for the app's workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from textual.pilot import Pilot

from engine.config import RunConfig
from engine.formats.checkpoints import save_checkpoint
from engine.models.architectures import ArchSpec
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import Normalization
from workbench.app import WorkbenchApp, build_config

IMAGE_SIZE = 16  # small inputs keep pruning checks, evaluation and fine-tuning fast


def save_test_checkpoint(path: Path, in_channels: int = 1) -> Path:
    """A seeded, untrained CIFAR ResNet-20 as a workbench checkpoint."""
    torch.manual_seed(0)
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": 10, "in_channels": in_channels, "width": 16,
    })
    model = CifarResNet(20, num_classes=10, in_channels=in_channels)
    save_checkpoint(path, model, spec, Normalization((0.2,) * in_channels, (0.3,) * in_channels))
    return path


def make_config(checkpoint: Path | None, **extra: Any) -> RunConfig:
    overrides = {
        "run.device": "cpu", "finetune.device": "cpu", "data.image_size": IMAGE_SIZE,
        "evaluate.max_examples": 8, "evaluate.frequency": False, "evaluate.corruption": False,
        "finetune.batch_size": 128, "deploy.form": "grouped", "data.spec": "digits",
        "prune.recalibrate_images": 256, **extra,
    }
    if checkpoint is not None:
        overrides["model.checkpoint"] = str(checkpoint)
    return build_config(None, overrides)


async def settle(app: WorkbenchApp, pilot: Pilot[Any]) -> None:
    """Wait for every worker and the messages they posted (the open job starts once the first
    frame is up, so wait for it to exist first, unless the file was refused at once)."""
    while not app.jobs and app.session.open_error is None:
        await pilot.pause()
    await app.workers.wait_for_complete()
    await pilot.pause()
