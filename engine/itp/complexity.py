"""The hardware side of in-train pruning (SPEC §8, ITP Eq. 3 and 4): each masked layer's dense
cost (MACs or params), which masked conv reads a layer's outputs directly (channel masks also
shrink the producer), the complexity `Σψ_l / Σψ_l^0` through the straight-through masks, the
hinge loss toward ψ*, and the whole-model effective MACs and params the masks leave."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..models.metrics import count_cost
from .masks import MaskedConv

# Modules and functions that act per channel: a conv's output passing only through these still
# has its channels one to one with the reading conv's input channels.
_PER_CHANNEL_MODULES = (nn.BatchNorm2d, nn.ReLU, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)
_PER_CHANNEL_FUNCTIONS = (F.relu, torch.relu, torch.relu_)


@dataclass(frozen=True)
class LayerCost:
    """A masked conv's dense MACs (one image) and weight count, and the masked conv that reads
    its outputs directly (None: the outputs go elsewhere too, e.g. into a residual add)."""

    name: str
    macs: int
    params: int
    reader: str | None


def direct_readers(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """For each named conv whose outputs reach exactly one of the named convs as its input
    through per-channel operations only (BatchNorm, ReLU, pooling, dropout), that conv. Found
    by tracing the model with torch.fx; a model that does not trace has none (every
    `μ_{l+1} = 1`, the conservative choice)."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - fx rejects many dynamic forwards; fall back, never fail
        return {}
    modules = dict(model.named_modules())
    wanted = set(names)
    readers: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if user.op == "call_module" and user.target in wanted and user.args and user.args[0] is current:
                readers[node.target] = str(user.target)
                break
            per_channel = (
                (user.op == "call_module" and isinstance(modules.get(str(user.target)), _PER_CHANNEL_MODULES))
                or (user.op == "call_function" and user.target in _PER_CHANNEL_FUNCTIONS)
                or (user.op == "call_method" and user.target in ("relu", "relu_"))
            )
            if not per_channel or not user.args or user.args[0] is not current:
                break
            current = user
    return readers


def layer_costs(model: nn.Module, names: Sequence[str], input_shape: tuple[int, ...],
                granularity: str) -> dict[str, LayerCost]:
    """Dense cost of every named conv at `input_shape`; readers only matter for channel masks."""
    macs = count_cost(model, input_shape).layer_macs
    readers = direct_readers(model, names) if granularity == "channel" else {}
    return {
        name: LayerCost(name, macs.get(name, 0), model.get_submodule(name).weight.numel(), readers.get(name))
        for name in names
    }


class Complexity:
    """ψ over the masked layers: `ψ_l = μ_l · cost_l` (times `μ` of the direct reader for channel
    masks), relative to the dense `Σψ_l^0`, with μ_l the share of mask entries on."""

    def __init__(self, layers: dict[str, MaskedConv], costs: dict[str, LayerCost], measure: str) -> None:
        self.layers, self.costs, self.measure = layers, costs, measure
        self.total = float(sum(self._cost(name) for name in layers))

    def _cost(self, name: str) -> int:
        cost = self.costs[name]
        return cost.macs if self.measure == "macs" else cost.params

    def entry_cost(self, name: str) -> float:
        """The cost one mask entry of a non-channel layer stands for."""
        return self._cost(name) / self.layers[name].mask.numel()

    def _share(self, name: str, differentiable: bool) -> torch.Tensor:
        layer = self.layers[name]
        return (layer.current() if differentiable else layer.binary).float().mean()

    def layer_terms(self, differentiable: bool = False) -> dict[str, torch.Tensor]:
        """ψ_l of every masked layer (in the cost's units)."""
        terms = {}
        for name in self.layers:
            share = self._share(name, differentiable)
            reader = self.costs[name].reader
            if reader is not None and reader in self.layers:
                share = share * self._share(reader, differentiable)
            terms[name] = share * self._cost(name)
        return terms

    def relative(self, differentiable: bool = False) -> torch.Tensor:
        """Σψ_l / Σψ_l^0; with `differentiable`, through the straight-through masks of the layers
        that are learning."""
        return torch.stack(list(self.layer_terms(differentiable).values())).sum() / self.total

    def effective(self, whole_macs: int, whole_params: int) -> tuple[int, int]:
        """Whole-model MACs and params with the masked layers at their current share."""
        macs, params = float(whole_macs), float(whole_params)
        for name in self.layers:
            share = float(self._share(name, False))
            reader = self.costs[name].reader
            if reader is not None and reader in self.layers:
                share *= float(self._share(reader, False))
            cost = self.costs[name]
            macs -= (1.0 - share) * cost.macs
            params -= (1.0 - share) * cost.params
        return round(macs), round(params)


def hw_loss(relative: torch.Tensor, target: float) -> torch.Tensor:
    """L_HW = max(Σψ/Σψ^0 − ψ*, 0) (ITP Eq. 3): zero exactly when the target is met."""
    return torch.clamp(relative - target, min=0.0)
