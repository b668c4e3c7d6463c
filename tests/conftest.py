"""Shared fixtures: the `../shared` folder (tests needing it skip cleanly without it) and a
freshly seeded torch RNG for every test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_CHECKPOINT = SHARED / "checkpoints" / "cifar10_resnet20_dp-wrapped.th"


@pytest.fixture(autouse=True)
def _deterministic_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_checkpoint() -> Path:
    """Path to the real public CIFAR-10 ResNet-20 checkpoint; skips when ../shared is absent."""
    if not SHARED_CHECKPOINT.is_file():
        pytest.skip("../shared/checkpoints is not present")
    return SHARED_CHECKPOINT
