"""Multi-process runs under `torchrun --nproc_per_node=N`: the process group (NCCL on CUDA, gloo
on CPU), which process does what, and each process's shard of a dataset. Without torchrun
everything is one process."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Subset

from .devices import resolve_device
from .errors import ConfigError


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ConfigError(f"{name} is not set; start distributed runs with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be a whole number, got {text!r}") from None


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: `rank` of `world_size`, and the device it computes on.
    Only the main process (rank 0) writes files and reports progress."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: str = "auto") -> "DistContext":
        """A single-process context on `device`, or, when torchrun set WORLD_SIZE > 1, join the
        process group: CUDA device LOCAL_RANK with NCCL when `device` resolves to CUDA, else
        the CPU with gloo."""
        world = _env_int("WORLD_SIZE", 1)
        base = resolve_device(device)
        if world <= 1:
            return cls(0, 1, base)
        rank = _env_int("RANK")
        if base.type == "cuda":
            local = torch.device("cuda", _env_int("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            backend = "nccl"
        else:
            local, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return cls(rank, world, local)

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over every process (float64, exact for counts)."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        """`obj` from every process, in rank order."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (call once at the end of a torchrun script)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def shard(dataset: object, n: int, ctx: DistContext) -> Subset:
    """This process's strided share (`rank`, `rank + world_size`, ...) of the first `n` items."""
    return Subset(dataset, range(ctx.rank, n, ctx.world_size))  # type: ignore[arg-type]
