"""Fixtures of the workbench tests: one test checkpoint for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest
from pilot_support import save_test_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, untrained CIFAR ResNet-20 for 1-channel digits, as a workbench checkpoint."""
    return save_test_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet20_test.pt")
