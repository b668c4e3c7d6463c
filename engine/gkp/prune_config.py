"""The pruning vocabulary and PruneConfig (every knob of SPEC §1-4 with its default): plain data
without torch, so the run configuration and the TUI load before the engine does."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ..common.checks import MAX_SEED, flag, one_of, texts, whole, within
from ..common.errors import ConfigError
from .traces import TRACE_LEVELS

Compat = Literal["paper", "reference"]
COMPAT_VALUES: tuple[str, ...] = ("paper", "reference")
SCHEMES: tuple[str, ...] = ("kpca", "spectral", "tsne-dbscan")
SELECTIONS: tuple[str, ...] = ("smooth-beam", "greedy", "l2", "least-smooth", "random")
GKP_METHODS: dict[str, tuple[str, str]] = {
    "sr-gkp": ("smoothness-snaking", "smooth-beam"),
    "tmi-gkp": ("tmi", "greedy"),
}
# Every method by name with its (grouping, selection): the GKP ones, in-train mask pruning (SPEC
# §8, settings in engine.itp) and L1-norm filter pruning matched to GKP's MACs.
METHODS: dict[str, tuple[str, str]] = {**GKP_METHODS, "itp": ("itp", "itp-mask"), "l1-filter": ("none", "l1-norm")}
CLUSTER_PREFIX = "cluster:"
MAX_BEAM_CANDIDATES = 4096  # a beam holds up to beam_width ** (check_every + 1) sets before a cut
MAX_TICKET_EPOCH = 100_000  # as many epochs as fine-tuning allows
GROUPINGS: tuple[str, ...] = (
    "smoothness-snaking", "magnitude-snaking", "random", "tmi", *(CLUSTER_PREFIX + s for s in SCHEMES),
)


def check_rate_and_groups(rate: float, groups: int, prefix: str = "") -> None:
    """Reject a pruning rate outside [0, 1) or a group count below 1; `prefix` names the table."""
    whole(f"{prefix}groups", groups, 1)
    within(f"{prefix}rate", rate, 0.0, 1.0, high_open=True)


@dataclass
class PruneConfig:
    """Every pruning knob with the SPEC default. `grouping` / `selection` override the method's
    own stages for ablations (None = the method's); `recalibrate_images` training images
    re-estimate the BatchNorm statistics after pruning (0 = off)."""

    method: str = "sr-gkp"
    grouping: str | None = None
    selection: str | None = None
    rate: float = 0.4375
    groups: int = 8
    compat: str = "paper"
    seed: int = 0
    smoothness_power: int = 2
    include_pointwise: bool = False
    skip_stem: bool = True
    exclude: list[str] = field(default_factory=list)
    beam_width: int = 2
    check_every: int = 3
    csb_alpha: float = 0.9
    gamma_ratio: float = 0.2
    beta: float | str = "auto"
    tmi_alpha: float = 0.5
    ticket_window: tuple[int, int] = (35, 70)
    ticket_step: int = 1
    tmi_schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    trace_level: str = "decisions"
    recalibrate_images: int = 1024

    @property
    def resolved_grouping(self) -> str:
        return self.grouping or METHODS[self.method][0]

    @property
    def resolved_selection(self) -> str:
        return self.selection or METHODS[self.method][1]

    @property
    def ticket_epochs(self) -> list[int]:
        """The ticket epochs TMI scores: the window, both ends included, every `ticket_step`."""
        first, last = self.ticket_window
        return list(range(first, last + 1, self.ticket_step))

    def validate(self) -> None:
        """Raise `ConfigError` with one clear sentence for the first bad value."""
        one_of("prune.method", self.method, tuple(METHODS))
        if self.method not in GKP_METHODS and (self.grouping is not None or self.selection is not None):
            raise ConfigError(
                f"prune.grouping and prune.selection apply to {' and '.join(GKP_METHODS)}, not {self.method}"
            )
        if self.grouping is not None:
            one_of("prune.grouping", self.grouping, GROUPINGS)
        if self.selection is not None:
            one_of("prune.selection", self.selection, SELECTIONS)
        check_rate_and_groups(self.rate, self.groups, "prune.")
        one_of("prune.compat", self.compat, COMPAT_VALUES)
        one_of("prune.trace_level", self.trace_level, TRACE_LEVELS)
        whole("prune.seed", self.seed, 0, MAX_SEED)
        one_of("prune.smoothness_power", self.smoothness_power, (1, 2))
        for name in ("include_pointwise", "skip_stem"):
            flag(f"prune.{name}", getattr(self, name))
        texts("prune.exclude", self.exclude)
        whole("prune.beam_width", self.beam_width, 1)
        whole("prune.check_every", self.check_every, 1)
        if self.beam_width ** (self.check_every + 1) > MAX_BEAM_CANDIDATES:
            raise ConfigError(
                f"prune.beam_width ** (check_every + 1) is {self.beam_width ** (self.check_every + 1)} beam "
                f"candidates per start; at most {MAX_BEAM_CANDIDATES} are allowed"
            )
        within("prune.csb_alpha", self.csb_alpha, 0.0, 1.0)
        within("prune.gamma_ratio", self.gamma_ratio, 0.0, 1.0, low_open=True)
        if self.beta != "auto":
            within("prune.beta", self.beta, 0.0, math.inf, what='"auto" or a number >= 0')
        within("prune.tmi_alpha", self.tmi_alpha, 0.0, math.inf)
        window = self.ticket_window
        if (not isinstance(window, (list, tuple)) or len(window) != 2
                or not all(isinstance(e, int) and not isinstance(e, bool) for e in window)
                or not 0 <= window[0] <= window[1] <= MAX_TICKET_EPOCH):
            raise ConfigError(f"prune.ticket_window must be two epochs [first, last] with 0 <= first <= last <= "
                              f"{MAX_TICKET_EPOCH}, got {window!r}")
        whole("prune.ticket_step", self.ticket_step, 1)
        texts("prune.tmi_schemes", self.tmi_schemes, non_empty=True, distinct=True)
        for scheme in self.tmi_schemes:
            one_of("each of prune.tmi_schemes", scheme, SCHEMES)
        whole("prune.recalibrate_images", self.recalibrate_images, 0)

    def params(self) -> dict[str, Any]:
        """Every parameter, JSON-ready, with `grouping` / `selection` resolved."""
        data = dataclasses.asdict(self)
        data["ticket_window"] = list(self.ticket_window)
        data["grouping"], data["selection"] = self.resolved_grouping, self.resolved_selection
        return data
