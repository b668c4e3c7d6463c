"""Shared fixtures: the `../shared` folder (tests needing it skip cleanly without it), a freshly
seeded torch RNG for every test, and the `cuda` marker's skip on machines without CUDA."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_CHECKPOINT = SHARED / "checkpoints" / "cifar10_resnet20_dp-wrapped.th"
SHARED_CIFAR = SHARED / "data" / "cifar10-subset"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` skip on a machine without a CUDA device. Under `make mutate` the
    environment's GKP_MUTATE_TESTS (test files, space-separated) keeps only a module's own tests."""
    own = os.environ.get("GKP_MUTATE_TESTS", "").split()
    if own:
        kept = [item.nodeid.startswith(tuple(own)) for item in items]
        config.hook.pytest_deselected(items=[item for item, keep in zip(items, kept) if not keep])
        items[:] = [item for item, keep in zip(items, kept) if keep]
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the test models are small, and two spinning threads on a busy
    2-core machine slow a test by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_checkpoint() -> Path:
    """Path to the real public CIFAR-10 ResNet-20 checkpoint; skips when ../shared is absent."""
    if not SHARED_CHECKPOINT.is_file():
        pytest.skip("../shared/checkpoints is not present")
    return SHARED_CHECKPOINT


@pytest.fixture(scope="session")
def small_digits():
    """The digits dataset with 96 training and 32 validation images: training tests in seconds."""
    import dataclasses

    from torch.utils.data import Subset

    from engine.data.datasets import load_data

    bundle = load_data("digits")
    return dataclasses.replace(bundle, train=Subset(bundle.train, range(96)), val=Subset(bundle.val, range(32)))


@pytest.fixture
def tiny_cnn():
    """A factory of small seeded CNNs for digits: a stem, two prunable 3x3 convs (8→16, 16→16)
    with BatchNorm and ReLU, and a linear head."""
    from torch import nn

    def make(seed: int = 1) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
        )

    return make


@pytest.fixture
def shared_cifar() -> str:
    """`--data` spec of the real CIFAR-10 images in ../shared (a slice of the training set);
    skips when ../shared is absent."""
    if not (SHARED_CIFAR / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.skip("../shared/data/cifar10-subset is not present")
    return f"cifar10:{SHARED_CIFAR}"
