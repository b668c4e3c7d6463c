"""In-train pruning's training (SPEC §8, ITP Algorithm 1) as rules inside the fine-tune loop:
every batch FastAT (or clean) SGD on weights and masks together, masks learning only inside the
window `prune_start..prune_end` with an extra step on them along ∇(b·L_HW) every `prune_step`
iterations, then the masks freeze and the run ends in a pruning plan. Interrupted runs resume
from `last.pt` like any fine-tuning."""

from __future__ import annotations

import copy
import dataclasses
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..common.distributed import DistContext
from ..common.errors import Cancelled, ConfigError
from ..common.progress import ProgressCallback
from ..data.datasets import DataBundle
from ..gkp.grouping import magnitude_snaking, random_grouping, smoothness_snaking
from ..gkp.layers import discover_layers
from ..gkp.plan import PrunePlan, SkippedLayer
from ..gkp.prune_config import PruneConfig
from ..gkp.smoothness import kernel_smoothness
from ..gkp.traces import MaskEpoch, MaskFreeze, MaskSetup, TraceEvent
from ..models.metrics import count_cost
from ..models.normalization import Normalization
from ..training.finetune import FinetuneResult, finetune
from ..training.finetune_config import FinetuneConfig
from ..training.hooks import TrainingHooks
from .complexity import Complexity, LayerCost, hw_loss, layer_costs
from .freeze import FreezeResult, freeze_masks
from .itp_config import ItpConfig
from .masks import MaskedConv, install_masks, remove_masks
from .to_plan import masks_to_plan


@dataclass
class ItpSetup:
    """What in-train pruning acts on: the masked convs, those skipped (with reasons), the fixed
    filter groups of grouped-kernel masks, every masked conv's dense cost, ψ* and the model's
    dense MACs and params."""

    names: list[str]
    skipped: list[SkippedLayer]
    filter_groups: dict[str, list[list[int]]]
    grouping: str
    costs: dict[str, LayerCost]
    target: float
    whole_macs: int
    whole_params: int

    def fixed_cost(self, measure: str) -> float:
        """The unmasked part of the model's cost (stem, classifier, skipped convs)."""
        whole = self.whole_macs if measure == "macs" else self.whole_params
        return float(whole - sum(c.macs if measure == "macs" else c.params for c in self.costs.values()))


def _filter_groups(name: str, conv: nn.Conv2d, n: int, grouping: str, seed: int) -> list[list[int]]:
    if grouping == "contiguous":
        size = conv.out_channels // n
        return [list(range(g * size, (g + 1) * size)) for g in range(n)]
    if grouping == "random":
        return random_grouping(conv.out_channels, n, np.random.default_rng([seed, zlib.crc32(name.encode())]))
    if grouping == "magnitude-snaking" or conv.kernel_size == (1, 1):
        return magnitude_snaking(conv.weight, n).filter_groups
    return smoothness_snaking(kernel_smoothness(conv.weight.detach().double(), 2).numpy(), n).filter_groups


def itp_setup(model: nn.Module, prune: PruneConfig, itp: ItpConfig, input_shape: tuple[int, ...]) -> ItpSetup:
    """The masked convs of `model` (SPEC §1's eligible ones; grouped-kernel masks need C_out
    divisible by `prune.groups`), their groups and costs, and ψ* = 1 − `prune.rate`."""
    grouped = itp.granularity == "grouped-kernel"
    layers = discover_layers(model, groups=prune.groups if grouped else 1, rate=prune.rate,
                             compat=prune.compat, skip_stem=prune.skip_stem,  # type: ignore[arg-type]
                             include_pointwise=prune.include_pointwise, exclude=prune.exclude)
    names = [layer.name for layer in layers if layer.eligible]
    if not names:
        raise ConfigError("in-train pruning found no conv to mask (every conv is skipped: "
                          + "; ".join(f"{layer.name}: {layer.reason}" for layer in layers[:4]) + ")")
    groups = {name: _filter_groups(name, model.get_submodule(name), prune.groups, itp.resolved_grouping, prune.seed)
              for name in names} if grouped else {}
    cost = count_cost(model, input_shape)
    return ItpSetup(
        names=names,
        skipped=[SkippedLayer(layer.name, layer.reason or "not eligible") for layer in layers if not layer.eligible],
        filter_groups=groups,
        grouping=itp.resolved_grouping if grouped else "none",
        costs=layer_costs(model, names, input_shape, itp.granularity),
        target=1.0 - prune.rate,
        whole_macs=cost.macs,
        whole_params=cost.params,
    )


def _flat_changes(before: torch.Tensor, after: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Flat indices of entries that turned off and on from `before` to `after`."""
    b, a = before.flatten() > 0.5, after.flatten() > 0.5
    return tuple(torch.nonzero(b & ~a).flatten().tolist()), tuple(torch.nonzero(~b & a).flatten().tolist())


class ItpHooks(TrainingHooks):
    """The fine-tune loop's rules for in-train pruning; keeps the mask trace as it goes."""

    stage = "itp"

    def __init__(self, layers: dict[str, MaskedConv], setup: ItpSetup, config: ItpConfig) -> None:
        self.layers, self.setup, self.config = layers, setup, config
        self.complexity = Complexity(layers, setup.costs, config.cost)
        self.events: list[dict[str, Any]] = []
        self.previous = {name: layer.binary.detach().clone() for name, layer in layers.items()}
        self.freeze: FreezeResult | None = None
        self.learning = False

    def settings(self) -> dict[str, Any]:
        return {"itp": self.config.to_dict(), "target": self.setup.target, "layers": list(self.layers),
                "grouping": self.setup.grouping, "filter_groups": self.setup.filter_groups}

    def start_epoch(self, epoch: int) -> None:
        number = epoch + 1
        start, end = self.config.window
        self.learning = self.freeze is None and start <= number <= end
        for layer in self.layers.values():
            layer.learning = self.learning

    def after_step(self, step: int, lr: float) -> None:
        if not self.learning:
            return
        for layer in self.layers.values():
            layer.refresh()
        if step % self.config.prune_step == 0:
            self.hardware_step(lr)

    def hardware_step(self, lr: float) -> float:
        """One step on the masks along ∇(b·L_HW) through the straight-through masks (nothing
        once the target is met); returns L_HW before the step."""
        loss = hw_loss(self.complexity.relative(differentiable=True), self.setup.target)
        if float(loss.detach()) <= 0.0:
            return 0.0
        masks = [layer.mask for layer in self.layers.values()]
        grads = torch.autograd.grad(self.config.hw_weight * loss, masks)
        with torch.no_grad():
            for mask, grad in zip(masks, grads):
                mask.sub_(lr * grad)
        for layer in self.layers.values():
            layer.refresh()
        return float(loss.detach())

    def end_epoch(self, record: Any) -> None:
        epoch = record.epoch
        phase = "frozen" if self.freeze is not None else ("learning" if self.learning else "before")
        relative = float(self.complexity.relative())
        loss = float(hw_loss(torch.tensor(relative), self.setup.target))
        terms = self.complexity.layer_terms()
        for name, layer in self.layers.items():
            off, on = _flat_changes(self.previous[name], layer.binary)
            cost = self.setup.costs[name]
            dense = cost.macs if self.config.cost == "macs" else cost.params
            self.events.append(MaskEpoch(
                name, epoch, phase, int(layer.binary.sum()), layer.binary.numel(), off, on,
                float(terms[name]) / dense if dense else 1.0, relative, self.setup.target, loss,
                record.val.get("benign"),
            ).to_dict())
            self.previous[name] = layer.binary.detach().clone()
        if self.learning and epoch == self.config.window[1]:
            self._freeze(epoch)

    def _freeze(self, epoch: int) -> None:
        before = {name: layer.binary.detach().clone() for name, layer in self.layers.items()}
        self.freeze = freeze_masks(self.layers, self.complexity, self.setup.target,
                                   self.setup.fixed_cost(self.config.cost), self.config.tolerance)
        self.learning = False
        for name, layer in self.layers.items():
            off, on = _flat_changes(before[name], layer.binary)
            per_group = int(layer.binary[0].sum()) if layer.granularity == "grouped-kernel" else None
            self.events.append(MaskFreeze(
                name, epoch, int(layer.binary.sum()), layer.binary.numel(), per_group, off, on,
                self.freeze.learned, self.freeze.achieved, self.setup.target,
            ).to_dict())
            self.previous[name] = layer.binary.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        return {"events": list(self.events), "previous": dict(self.previous),
                "freeze": None if self.freeze is None else dataclasses.asdict(self.freeze)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.events = list(state["events"])
        self.previous = {name: tensor.clone() for name, tensor in state["previous"].items()}
        self.freeze = None if state["freeze"] is None else FreezeResult(**state["freeze"])


@dataclass
class ItpOutcome:
    """In-train pruning's result: the trained dense model (weights as trained, masks removed),
    the plan its frozen masks make, the training record, the trace, and how the target went."""

    model: nn.Module
    plan: PrunePlan
    training: FinetuneResult
    events: list[TraceEvent]
    freeze: FreezeResult
    setup: ItpSetup
    effective_macs: int
    effective_params: int


def training_config(finetune_config: FinetuneConfig, itp: ItpConfig) -> FinetuneConfig:
    """ITP's optimiser settings: the fine-tune table's (SPEC §7 defaults), over `itp.epochs` with
    the default step schedule, FastAT unless `adversarial` is false."""
    return dataclasses.replace(finetune_config, epochs=itp.epochs, milestones=None,
                               mode="fastat" if itp.adversarial else "standard", sam_rho=None)


def _reinitialise(model: nn.Module, seed: int) -> None:
    """Fresh PyTorch default initialisation of every layer, from `seed` (the global RNG is left
    as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset) and not list(module.children()):
                reset()
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()


def run_itp(
    model: nn.Module,
    data: DataBundle,
    normalization: Normalization,
    prune: PruneConfig,
    itp: ItpConfig,
    finetune_config: FinetuneConfig,
    input_shape: tuple[int, ...],
    out_dir: Path | None,
    *,
    resume: bool = False,
    arch: dict[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    ctx: DistContext | None = None,
) -> ItpOutcome:
    """Train a copy of `model` with pruning masks (SPEC §8) and return it with its plan. Same
    config and seed, same masks; `resume` continues from `out_dir/last.pt`."""
    itp.validate()
    work = copy.deepcopy(model)
    if itp.init == "scratch":
        _reinitialise(work, prune.seed)
    setup = itp_setup(work, prune, itp, input_shape)
    layers = install_masks(work, setup.names, itp.granularity, setup.filter_groups or None)
    hooks = ItpHooks(layers, setup, itp)
    training = finetune(work, data, normalization, training_config(finetune_config, itp), out_dir,
                        resume=resume, progress=progress, cancel=cancel, ctx=ctx, hooks=hooks)
    if not training.completed:
        raise Cancelled("in-train pruning interrupted")
    assert hooks.freeze is not None  # prune_end <= epochs, so the masks froze
    macs, params_count = hooks.complexity.effective(setup.whole_macs, setup.whole_params)
    params = {
        **prune.params(), "method": "itp", "grouping": setup.grouping, "selection": "itp-mask",
        **{f"itp_{k}": v for k, v in itp.to_dict().items()},
        "granularity": itp.granularity, "target_complexity": setup.target,
        "learned_complexity": hooks.freeze.learned, "achieved_complexity": hooks.freeze.achieved,
    }
    plan, done = masks_to_plan(layers, setup.filter_groups, setup.grouping, params, setup.skipped, arch)
    remove_masks(work)
    events: list[TraceEvent] = [
        MaskSetup(name, itp.granularity, tuple(layer.mask.shape), itp.cost,
                  setup.costs[name].macs if itp.cost == "macs" else setup.costs[name].params,
                  setup.costs[name].reader, setup.grouping,
                  tuple(tuple(g) for g in setup.filter_groups.get(name, []))) for name, layer in layers.items()
    ]
    events += [TraceEvent.from_dict(e) for e in hooks.events]
    events += done
    return ItpOutcome(work, plan, training, events, hooks.freeze, setup, macs, params_count)
