"""The AdaSAP settings (SPEC §9) with their defaults — the warmup stage, progressive pruning and
the robustness phase (`[warmup]`), and the sharpness measurement (`[sharpness]`): plain data
without torch, so the run configuration and the TUI load before the engine does."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..common.checks import flag, one_of, whole, within
from ..common.errors import ConfigError

IMPORTANCES: tuple[str, ...] = ("l2", "taylor")
SHARPNESS_WHEN: tuple[str, ...] = ("adasap", "always", "never")
MAX_EPOCHS = 100_000
MAX_IMAGES = 1_000_000


@dataclass
class WarmupConfig:
    """AdaSAP around any pruning method. Warmup: `epochs` of adaptive steps, each filter's radius
    ρ_i between `rho_min` and `rho_max` by its `importance` (ℓ2 norm or first-order Taylor).
    Pruning: for `pruning_epochs` the adaptive steps go on while the method re-plans every
    `prune_frequency` iterations on an exponential schedule (0 epochs: one-shot after warmup).
    Robustness: with `robust_finetune`, a run's fine-tune stage is ASAM at `robust_rho`."""

    epochs: int = 10
    rho_min: float = 0.01
    rho_max: float = 2.0
    importance: str = "l2"
    pruning_epochs: int = 1
    prune_frequency: int = 30
    robust_finetune: bool = True
    robust_rho: float = 2.0

    def validate(self) -> None:
        """Raise `ConfigError` with one sentence for the first bad value."""
        whole("warmup.epochs", self.epochs, 1, MAX_EPOCHS)
        within("warmup.rho_min", self.rho_min, 0.0)
        within("warmup.rho_max", self.rho_max, 0.0, low_open=True)
        if self.rho_max < self.rho_min:
            raise ConfigError(f"warmup.rho_max must be at least warmup.rho_min ({self.rho_min}), got {self.rho_max!r}")
        one_of("warmup.importance", self.importance, IMPORTANCES)
        whole("warmup.pruning_epochs", self.pruning_epochs, 0, MAX_EPOCHS)
        whole("warmup.prune_frequency", self.prune_frequency, 1)
        flag("warmup.robust_finetune", self.robust_finetune)
        within("warmup.robust_rho", self.robust_rho, 0.0, low_open=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SharpnessConfig:
    """The sharpness estimate `max_{‖ε‖₂≤rho} L(w+ε) − L(w)` by `steps` of projected gradient
    ascent on a fixed set of `images` training images; measured in runs with a warmup stage
    (`adasap`), in `always` every run, or `never`."""

    when: str = "adasap"
    rho: float = 0.05
    steps: int = 5
    images: int = 512

    def validate(self) -> None:
        one_of("sharpness.when", self.when, SHARPNESS_WHEN)
        within("sharpness.rho", self.rho, 0.0, low_open=True)
        whole("sharpness.steps", self.steps, 1, 1000)
        whole("sharpness.images", self.images, 1, MAX_IMAGES)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
