"""Parameter and MAC counts of any model, grouped convolutions included, measured with
PyTorch's own FLOP counter (`torch.utils.flop_counter.FlopCounterMode`); MACs = FLOPs / 2."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

MAC_COUNTER = "torch.utils.flop_counter.FlopCounterMode (conv + matmul ops; MACs = FLOPs/2)"


@dataclass(frozen=True)
class ModelCost:
    """Totals for one model at one input shape, plus the MACs of every leaf module by name."""

    params: int
    macs: int
    input_shape: tuple[int, ...]
    layer_macs: dict[str, int] = field(default_factory=dict)
    counter: str = MAC_COUNTER

    def to_dict(self) -> dict[str, object]:
        return {
            "params": self.params,
            "macs": self.macs,
            "input_shape": list(self.input_shape),
            "counter": self.counter,
        }


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as index tables and BN statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def _counter_without_dynamo() -> FlopCounterMode:
    """A FLOP counter whose dispatch does not import TorchDynamo. Torch wraps every dispatch
    mode's `__torch_dispatch__` so that Dynamo never compiles it, and that wrapper imports
    `torch._dynamo` (2.5-3 s here) on first use. Counting never runs under `torch.compile`, so the
    wrapper is pointed at the plain function; where torch's internals differ, nothing changes."""
    dispatch = getattr(flop_counter, "_FlopCounterMode", None)
    wrapped = getattr(dispatch, "__dict__", {}).get("__torch_dispatch__")
    raw = getattr(wrapped, "__wrapped__", None)
    if raw is not None and not hasattr(raw, "__dynamo_disable"):
        setattr(raw, "__dynamo_disable", raw)
    return FlopCounterMode(display=False)


def count_cost(model: nn.Module, input_shape: tuple[int, ...]) -> ModelCost:
    """Run one forward pass of a zero batch of `input_shape` (batch dimension included, usually
    1) on the model's device under the FLOP counter, in eval mode, without gradients."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    counter = _counter_without_dynamo()
    try:
        with counter, torch.no_grad():
            model(torch.zeros(input_shape, device=device))
    finally:
        model.train(was_training)
    leaves = {name for name, module in model.named_modules() if not list(module.children())}
    layer_macs: dict[str, int] = {}
    for key, ops in counter.get_flop_counts().items():
        name = key.split(".", 1)[1] if "." in key else ""
        if name in leaves:
            layer_macs[name] = int(sum(ops.values()) // 2)
    return ModelCost(
        params=count_params(model),
        macs=int(counter.get_total_flops() // 2),
        input_shape=tuple(input_shape),
        layer_macs=layer_macs,
    )
