"""Training batches: an in-memory split sliced as one tensor gives exactly the items the dataset
serves one by one, and an image folder read by DataLoader workers gives the same batches, in
the order asked for, as reading it in the loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from engine.data.batches import TrainBatches, loader_workers
from engine.data.datasets import ImageTensorDataset, in_memory, load_data


def _items(dataset, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in indices.tolist()]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def _nested(base: ImageTensorDataset) -> Subset:
    """Subsets of subsets, as splits of splits are built."""
    outer = torch.randperm(len(base), generator=torch.Generator().manual_seed(1))[:40].tolist()
    inner = list(range(3, 33))
    return Subset(Subset(base, outer), inner)


@pytest.mark.parametrize(("stored", "channels", "size"), [
    ("uint8-rgb", 3, 32), ("uint8-rgb", 1, 32), ("uint8-rgb", 3, 20), ("float-gray", 3, 32), ("float-gray", 1, 24),
])
def test_in_memory_batches_equal_the_items(stored: str, channels: int, size: int) -> None:
    generator = torch.Generator().manual_seed(0)
    if stored == "uint8-rgb":
        images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=generator)
    else:
        images = torch.rand(50, 1, 32, 32, generator=generator)
    base = ImageTensorDataset(images, torch.randint(0, 10, (50,), generator=generator).tolist(), channels, size)
    split = _nested(base)
    memory = in_memory(split)
    assert memory is not None
    indices = torch.tensor([29, 0, 7, 7, 15])
    images_batch, labels_batch = memory.batch(indices)
    expected_images, expected_labels = _items(split, indices)
    assert images_batch.dtype == torch.float32 and images_batch.shape == (5, channels, size, size)
    assert torch.equal(images_batch, expected_images) and torch.equal(labels_batch, expected_labels)


def test_digits_train_split_is_in_memory_and_files_are_not(tmp_path: Path) -> None:
    digits = load_data("digits")
    memory = in_memory(digits.train)
    assert memory is not None and len(memory.rows) == len(digits.train)
    _folder(tmp_path, 10)
    assert in_memory(load_data(f"imagefolder:{tmp_path}").train) is None


def _folder(root: Path, per_class: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for name in ("a", "b", "c"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (10, 12, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")


@pytest.mark.parametrize("workers", [0, 1])
def test_image_folder_batches_come_in_order_from_the_loader(tmp_path: Path, workers: int) -> None:
    _folder(tmp_path, 10)
    train = load_data(f"imagefolder:{tmp_path}").train
    source = TrainBatches(train, torch.device("cpu"), workers=workers)
    assert source.memory is None
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(2))
    batches = list(order.split(8))
    for epoch in range(2):  # the second epoch reuses the persistent workers
        got = list(source.epoch(batches))
        assert len(got) == len(batches)
        for (images, labels, indices), wanted in zip(got, batches):
            expected_images, expected_labels = _items(train, wanted)
            assert torch.equal(indices, wanted)
            assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    source.close()


def test_in_memory_source_moves_indices_once_per_epoch() -> None:
    digits = load_data("digits")
    source = TrainBatches(digits.train, torch.device("cpu"))
    assert source.memory is not None
    batches = [torch.tensor([5, 1]), torch.tensor([9]), torch.tensor([0, 2, 4])]
    for (images, labels, indices), wanted in zip(source.epoch(batches), batches):
        expected_images, expected_labels = _items(digits.train, wanted)
        assert torch.equal(indices, wanted) and torch.equal(images, expected_images)
        assert torch.equal(labels, expected_labels)


def test_loader_workers_leave_a_core_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert loader_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0}, raising=False)
    assert loader_workers() == 0
