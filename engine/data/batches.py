"""Training batches by dataset index, delivered on the training device: an in-memory split is
moved there once and sliced per batch (no per-item loop, no per-step copy); any other dataset
(image folders) is read by `DataLoader` worker processes into pinned memory and copied without
blocking, so decoding overlaps the step running on the device."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import InMemorySplit, in_memory

# At most this many worker processes read files for one training process.
MAX_WORKERS = 8


def loader_workers() -> int:
    """Worker processes per training process: the cores this process may use, shared among the
    torchrun processes of this machine, less one for the loop; 0 reads in the loop itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_WORKERS, cores // local - 1))


class _Batches:
    """Batch sampler replaying the index lists set for the current epoch (a persistent-worker
    loader asks its sampler anew at every epoch)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _WithIndex(Dataset):
    """Items with their index, so a worker's batch carries its indices in pinned memory too."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[index]
        return image, label, index


class TrainBatches:
    """(images, labels, indices) for lists of dataset indices, on `device`: float [0, 1] images
    as the dataset serves them, int64 labels, and the indices (for per-index augmentation)."""

    def __init__(self, dataset: Dataset, device: torch.device, workers: int | None = None) -> None:
        self.device = device
        split = in_memory(dataset)
        self.memory: InMemorySplit | None = None if split is None else split.to(device)
        self._sampler = _Batches()
        self._loader: DataLoader | None = None
        if self.memory is None:
            count = loader_workers() if workers is None else workers
            context = None
            if count > 0:
                # Not fork: the TUI runs this from a worker thread, and forking a threaded process
                # can copy a held lock into the child.
                methods = multiprocessing.get_all_start_methods()
                context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self._loader = DataLoader(
                _WithIndex(dataset), batch_sampler=self._sampler, num_workers=count, pin_memory=device.type == "cuda",
                persistent_workers=count > 0, multiprocessing_context=context,
            )

    def epoch(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of dataset indices `batches`, in order."""
        if self.memory is not None:
            moved = torch.cat(batches).to(self.device) if batches else torch.empty(0, dtype=torch.long)
            for indices in moved.split([len(b) for b in batches]):
                images, labels = self.memory.batch(indices)
                yield images, labels, indices
            return
        assert self._loader is not None
        self._sampler.batches = [b.tolist() for b in batches]
        for images, labels, indices in self._loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True),
                   indices.to(self.device, non_blocking=True))

    def close(self) -> None:
        """Stop the loader's worker processes."""
        self._loader = None
