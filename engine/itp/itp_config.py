"""ItpConfig, the settings of in-train mask pruning (SPEC §8) with their defaults: plain data
without torch, so the run configuration and the TUI load before the engine does."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..common.checks import flag, one_of, whole, within
from ..common.errors import ConfigError

GRANULARITIES: tuple[str, ...] = ("grouped-kernel", "kernel", "channel", "weight")
COSTS: tuple[str, ...] = ("macs", "params")
INITS: tuple[str, ...] = ("checkpoint", "scratch")
ITP_GROUPINGS: tuple[str, ...] = ("smoothness-snaking", "magnitude-snaking", "random", "contiguous")
MAX_EPOCHS = 100_000


@dataclass
class ItpConfig:
    """In-train pruning: mask `granularity`, the complexity measure (`cost`) the hardware loss
    drives toward `1 - prune.rate` with weight `hw_weight` (b), the mask-learning window
    `prune_start`..`prune_end` (1-based epochs, inclusive) of `epochs`, an extra hardware step on
    the masks every `prune_step` iterations, FastAT in the loop unless `adversarial` is false,
    and the start: the checkpoint's weights or a fresh initialisation. Grouped-kernel masks use
    filter groups from `grouping` (contiguous when training from scratch). After the window the
    masks freeze; if the complexity then misses the target by more than `tolerance` (relative),
    the masks are completed to it in order of their learned values. A window end of 0 means
    `1 + epochs // 10` and `ceil(0.8 * epochs)`: the paper's epochs 20 and 240 of 300."""

    granularity: str = "grouped-kernel"
    cost: str = "macs"
    hw_weight: float = 20000.0
    epochs: int = 10
    prune_start: int = 0
    prune_end: int = 0
    prune_step: int = 1
    adversarial: bool = True
    init: str = "checkpoint"
    grouping: str = "smoothness-snaking"
    tolerance: float = 0.02

    def validate(self) -> None:
        """Raise `ConfigError` with one sentence for the first bad value."""
        one_of("itp.granularity", self.granularity, GRANULARITIES)
        one_of("itp.cost", self.cost, COSTS)
        within("itp.hw_weight", self.hw_weight, 0.0, low_open=True)
        whole("itp.epochs", self.epochs, 1, MAX_EPOCHS)
        whole("itp.prune_start", self.prune_start, 0, self.epochs)
        whole("itp.prune_end", self.prune_end, 0, self.epochs)
        start, end = self.window
        if end < start:
            raise ConfigError(f"itp.prune_end must be at least the window's start ({start}), got {self.prune_end!r}")
        whole("itp.prune_step", self.prune_step, 1)
        flag("itp.adversarial", self.adversarial)
        one_of("itp.init", self.init, INITS)
        one_of("itp.grouping", self.grouping, ITP_GROUPINGS)
        within("itp.tolerance", self.tolerance, 0.0, 0.5, low_open=True)

    @property
    def window(self) -> tuple[int, int]:
        """The mask-learning epochs (1-based, inclusive), defaults resolved."""
        start = self.prune_start or 1 + self.epochs // 10
        return start, self.prune_end or max(start, math.ceil(0.8 * self.epochs))

    @property
    def resolved_grouping(self) -> str:
        """The filter grouping of grouped-kernel masks: contiguous when training from scratch
        (random weights have nothing to group by)."""
        return "contiguous" if self.init == "scratch" else self.grouping

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
