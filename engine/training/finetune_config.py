"""FinetuneConfig, the fine-tuning settings with both papers' defaults, and their vocabulary:
plain data without torch, so the run configuration and the TUI load before the engine does."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from ..common.checks import flag, real, whole
from ..common.devices import check_device
from ..common.errors import ConfigError
from ..robustness.attack_spec import AttackSpec

MODES: tuple[str, ...] = ("standard", "fastat", "sam", "asam")
SCHEDULES: tuple[str, ...] = ("step", "cosine")
DEFAULT_RHO: dict[str, float] = {"sam": 0.05, "asam": 0.5}


def metric_filename(metric: str) -> str:
    """The file-name form of a metric: `benign` → `benign`, `pgd-8/255` → `pgd-8-255`."""
    return re.sub(r"[^a-z0-9._-]+", "-", metric.lower()).strip("-.")


@dataclass
class FinetuneConfig:
    """Fine-tuning settings; defaults are both papers' (SGD lr 0.01, momentum 0.9, weight decay
    5e-4, step decay ×0.1, batch 64, crop + flip). Step milestones default to half and three
    quarters of the epochs; `sam_rho` to 0.05 (sam) or 0.5 (asam). `amp` and `channels_last`
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
        whole("finetune.epochs", self.epochs, 1)
        if real("finetune.lr", self.lr) <= 0:
            raise ConfigError(f"finetune.lr must be positive, got {self.lr!r}")
        if not 0 <= real("finetune.momentum", self.momentum) < 1:
            raise ConfigError(f"finetune.momentum must be in [0, 1), got {self.momentum!r}")
        if real("finetune.weight_decay", self.weight_decay) < 0:
            raise ConfigError(f"finetune.weight_decay must not be negative, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"finetune.schedule must be step or cosine, got {self.schedule!r}")
        if self.milestones is not None:
            good = isinstance(self.milestones, list) and all(
                isinstance(m, int) and not isinstance(m, bool) for m in self.milestones
            )
            if not good or sorted(set(self.milestones)) != self.milestones or any(
                not 1 <= m < self.epochs for m in self.milestones
            ):
                raise ConfigError(
                    f"finetune.milestones must be increasing epochs between 1 and {self.epochs - 1}, "
                    f"got {self.milestones!r}"
                )
        if not 0 < real("finetune.gamma", self.gamma) <= 1:
            raise ConfigError(f"finetune.gamma must be in (0, 1], got {self.gamma!r}")
        whole("finetune.batch_size", self.batch_size, 1)
        if self.mode not in MODES:
            raise ConfigError(f"finetune.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < real("finetune.fastat_eps", self.fastat_eps) <= 1:
            raise ConfigError(f"finetune.fastat_eps must be in (0, 1] (pixel units), got {self.fastat_eps!r}")
        if real("finetune.fastat_alpha", self.fastat_alpha) <= 0:
            raise ConfigError(f"finetune.fastat_alpha must be positive, got {self.fastat_alpha!r}")
        if self.sam_rho is not None and real("finetune.sam_rho", self.sam_rho) <= 0:
            raise ConfigError(f"finetune.sam_rho must be positive, got {self.sam_rho!r}")
        for name in ("augment", "amp", "channels_last", "compile"):
            flag(f"finetune.{name}", getattr(self, name))
        check_device(self.device, "finetune.device")
        whole("finetune.eval_every", self.eval_every, 1)
        if self.eval_max_examples is not None:
            whole("finetune.eval_max_examples", self.eval_max_examples, 1)
        whole("finetune.seed", self.seed, 0)
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
