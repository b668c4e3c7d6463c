"""Multi-process runs under `torchrun --nproc_per_node=N`: the process group (NCCL on CUDA, gloo
on CPU), which process does what, and each process's shard of a dataset. Without torchrun
everything is one process.

Host-side agreement (summed counts, gathered reports, a plan broadcast from rank 0, whether to
stop) goes through a separate gloo group on CPU tensors: it never waits on the GPU, and its long
timeout lets ranks wait while rank 0 alone plans, instead of NCCL's 10 minutes."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Subset

from .devices import resolve_device
from .errors import Cancelled, ConfigError

# How long a rank waits in a host-side collective for the others (rank 0 may plan a large model
# alone meanwhile); a crashed rank does not make the others wait this long, torchrun stops them.
CONTROL_TIMEOUT = timedelta(hours=6)


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
    Only the main process (rank 0) writes files and reports progress. `control` is the gloo
    group for host-side collectives (None: the default group)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: Any = field(default=None, compare=False, repr=False)

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
        the CPU with gloo; plus the gloo control group."""
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
        return cls(rank, world, local, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of `values` over every process (float64, exact for counts)."""
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.control)
        return tensor.tolist()

    def any_set(self, event: threading.Event | None) -> bool:
        """Whether `event` is set on any process; every process must call this at the same
        point, so all of them take the same decision (stop, or go on) together."""
        local = event is not None and event.is_set()
        if not self.distributed:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.control)
        return bool(flag.item())

    def check_cancel(self, event: threading.Event | None) -> None:
        """Raise `Cancelled` on every process when `event` is set on any of them."""
        if self.any_set(event):
            raise Cancelled("cancelled")

    def all_gather(self, obj: Any) -> list[Any]:
        """`obj` from every process, in rank order."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.control)
        return gathered

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process (the others pass None), so work done once on rank 0
        is shared rather than repeated."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.control)

    def close(self) -> None:
        """Leave the process group (call once at the end of a torchrun script)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def shard(dataset: object, n: int, ctx: DistContext) -> Subset:
    """This process's strided share (`rank`, `rank + world_size`, ...) of the first `n` items."""
    return Subset(dataset, range(ctx.rank, n, ctx.world_size))  # type: ignore[arg-type]
