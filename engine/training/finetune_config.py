"""FinetuneConfig, the fine-tuning settings with both papers' defaults, and their vocabulary:
plain data without torch, so the run configuration and the TUI load before the engine does."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..common.checks import MAX_SEED, flag, one_of, whole, wholes, within
from ..common.devices import check_device
from ..common.errors import ConfigError
from ..robustness.attack_spec import AttackSpec

MODES: tuple[str, ...] = ("standard", "fastat", "sam", "asam")
# How sam/asam normalise the perturbation: over all parameters at once (SAM, ASAM) or per filter
# of every conv and linear weight (AdaSAP's Algorithm 2 taken literally, ρ_min = ρ_max).
SAM_PARTITIONS: tuple[str, ...] = ("global", "filter")
SCHEDULES: tuple[str, ...] = ("step", "cosine")
DEFAULT_RHO: dict[str, float] = {"sam": 0.05, "asam": 0.5}
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536


def metric_filename(metric: str) -> str:
    """The file-name form of a metric: `benign` → `benign`, `pgd-8/255` → `pgd-8-255`."""
    return re.sub(r"[^a-z0-9._-]+", "-", metric.lower()).strip("-.")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; defaults are both papers' (SGD lr 0.01, momentum 0.9, weight decay
    5e-4, step decay ×0.1, batch 64, crop + flip). Step milestones default to half and three
    quarters of the epochs; `sam_rho` to 0.05 (sam) or 0.5 (asam), normalised over all parameters
    at once or per filter (`sam_partition`). `amp` and `channels_last`
    only take effect on CUDA. `track_attacks` are validated on every `eval_every`-th epoch and the
    last, as specs or `parse_attack` text."""

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: list[int] | None = None
    gamma: float = 0.1
    batch_size: int = 64
    mode: str = "standard"
    fastat_eps: float = 8 / 255
    fastat_alpha: float = 10 / 255
    sam_rho: float | None = None
    sam_partition: str = "global"
    augment: bool = True
    device: str = "auto"
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    eval_every: int = 1
    track_attacks: list[AttackSpec | str] = field(default_factory=list)
    eval_max_examples: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise `ConfigError` with one sentence for the first bad value."""
        whole("finetune.epochs", self.epochs, 1, MAX_EPOCHS)
        within("finetune.lr", self.lr, 0.0, low_open=True)
        within("finetune.momentum", self.momentum, 0.0, 1.0, high_open=True)
        within("finetune.weight_decay", self.weight_decay, 0.0)
        one_of("finetune.schedule", self.schedule, SCHEDULES)
        if self.milestones is not None:
            wholes("finetune.milestones", self.milestones, 1, self.epochs - 1, increasing=True)
        within("finetune.gamma", self.gamma, 0.0, 1.0, low_open=True)
        whole("finetune.batch_size", self.batch_size, 1, MAX_BATCH)
        one_of("finetune.mode", self.mode, MODES)
        within("finetune.fastat_eps", self.fastat_eps, 0.0, 1.0, low_open=True, what="a number in (0, 1] (pixel units)")
        within("finetune.fastat_alpha", self.fastat_alpha, 0.0, low_open=True)
        if self.sam_rho is not None:
            within("finetune.sam_rho", self.sam_rho, 0.0, low_open=True)
        one_of("finetune.sam_partition", self.sam_partition, SAM_PARTITIONS)
        for name in ("augment", "amp", "channels_last", "compile"):
            flag(f"finetune.{name}", getattr(self, name))
        check_device(self.device, "finetune.device")
        whole("finetune.eval_every", self.eval_every, 1)
        if self.eval_max_examples is not None:
            whole("finetune.eval_max_examples", self.eval_max_examples, 1)
        whole("finetune.seed", self.seed, 0, MAX_SEED)
        labels = [s.label for s in self.attack_specs()]
        names = [metric_filename(label) for label in labels]
        if "benign" in names or "" in names or len(set(names)) != len(names):
            raise ConfigError(
                "finetune.track_attacks labels must be distinct, not 'benign', and differ in "
                f"letters or digits (they name best_<label>.pt files), got {labels}"
            )

    def attack_specs(self) -> list[AttackSpec]:
        """`track_attacks` as `AttackSpec`s (text entries parsed with `parse_attack`)."""
        if not isinstance(self.track_attacks, list):
            raise ConfigError(f"finetune.track_attacks must be a list of attacks, got {self.track_attacks!r}")
        if not self.track_attacks:
            return []
        from ..robustness.attacks import (
            parse_attack,  # torchattacks is heavy: load it only when attacks are tracked
        )

        specs = []
        for item in self.track_attacks:
            if isinstance(item, str):
                specs.append(parse_attack(item))
            elif isinstance(item, AttackSpec):
                specs.append(item)
            else:
                raise ConfigError(f"finetune.track_attacks entries must be attack specs or text, got {item!r}")
        return specs

    def resolved_milestones(self) -> list[int]:
        if self.milestones is not None:
            return list(self.milestones)
        return sorted({m for m in (self.epochs // 2, 3 * self.epochs // 4) if m >= 1})

    def resolved_rho(self) -> float:
        return self.sam_rho if self.sam_rho is not None else DEFAULT_RHO.get(self.mode, DEFAULT_RHO["sam"])

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (attacks as name/params/label dicts), for checkpoints and metadata."""
        data = asdict(self)
        data["track_attacks"] = [asdict(s) for s in self.attack_specs()]
        return data
