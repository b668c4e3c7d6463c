"""Fixtures shared by the workbench tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.formats.checkpoints import save_checkpoint
from engine.models.architectures import ArchSpec
from engine.models.cifar_resnet import CifarResNet
from engine.models.normalization import Normalization


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained CIFAR ResNet-20 for 1-channel digits, as a workbench checkpoint."""
    torch.manual_seed(0)
    spec = ArchSpec("cifar_resnet", "resnet20", {
        "depth": 20, "naming": "layer", "shortcut": "A", "num_classes": 10, "in_channels": 1, "width": 16,
    })
    path = tmp_path_factory.mktemp("ckpt") / "resnet20_test.pt"
    save_checkpoint(path, CifarResNet(20, num_classes=10, in_channels=1), spec, Normalization((0.2,), (0.3,)))
    return path
