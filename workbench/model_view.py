"""What the workbench screens show about an opened model, computed with the engine once (in a
worker) and handed to the UI as plain data: the summary lines, the per-layer table rows and
each conv's kernel-smoothness matrix."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from engine.layers import ConvLayer
from engine.metrics import ModelCost, count_cost
from engine.plan import PrunePlan
from engine.reconstruct import GroupedKernelConv
from engine.smoothness import kernel_smoothness

if TYPE_CHECKING:
    from engine.pipeline import Workspace

WILL_PRUNE, PRUNED, SKIPPED = "will prune", "pruned", "skipped"


@dataclass(frozen=True)
class LayerRow:
    """One conv in the layer table. `ratio` is the achieved pruning ratio once pruned, the planned
    one while it will be pruned; `macs_after` only exists after pruning."""

    name: str
    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    params: int
    macs: int | None
    mean_smoothness: float | None
    status: str
    reason: str | None
    ratio: float | None
    kept: int | None
    macs_after: int | None = None

    @property
    def shape_text(self) -> str:
        return f"{self.out_channels}×{self.in_channels}×{self.kernel_size[0]}×{self.kernel_size[1]}"

    @property
    def status_text(self) -> str:
        return f"{SKIPPED}: {self.reason}" if self.status == SKIPPED and self.reason else self.status


@dataclass
class ModelInfo:
    """Everything computed when a model opens: its cost at the dataset's input size and, for
    every conv, the C_out × C_in kernel-smoothness matrix of its dense weights (float32, for
    drawing) and each filter's smoothness (float64, the values snaking sorts by)."""

    cost: ModelCost
    smoothness: dict[str, np.ndarray] = field(default_factory=dict)
    filter_smoothness: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def dense_conv_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The (C_out, C_in, k, k) weight of conv `name`; a pruned layer is expanded to its dense
    form with the pruned kernels zero."""
    module = model.get_submodule(name)
    if isinstance(module, GroupedKernelConv):
        module = module.to_dense_conv()
    return module.weight.detach()


def conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def inspect_model(model: nn.Module, input_shape: tuple[int, ...], power: float) -> ModelInfo:
    """Cost and smoothness matrices of every conv (depthwise and grouped convs excluded, whose
    kernels do not form a C_out × C_in matrix)."""
    start = time.perf_counter()
    info = ModelInfo(count_cost(model, input_shape))
    for name in conv_names(model):
        module = model.get_submodule(name)
        if isinstance(module, GroupedKernelConv) or module.groups == 1:  # type: ignore[union-attr]
            heat = kernel_smoothness(dense_conv_weight(model, name), power)
            info.smoothness[name] = heat.numpy().astype(np.float32)
            # What engine.smoothness.filter_smoothness returns, without recomputing the matrix.
            info.filter_smoothness[name] = heat.sum(dim=1).numpy()
    info.seconds = time.perf_counter() - start
    return info


def _shape(model: nn.Module, layer: ConvLayer) -> tuple[int, int, tuple[int, int], int]:
    """Dense shape and parameter count of a conv, pruned layers counted as they are now."""
    module = model.get_submodule(layer.name)
    params = sum(p.numel() for p in module.parameters(recurse=False))
    in_channels = module.dense_in_channels if isinstance(module, GroupedKernelConv) else layer.in_channels
    return layer.out_channels, in_channels, layer.kernel_size, params


def layer_rows(
    model: nn.Module,
    layers: list[ConvLayer],
    info: ModelInfo,
    plan: PrunePlan | None,
    cost_after: ModelCost | None = None,
) -> list[LayerRow]:
    """Table rows for every conv: pruned (in `plan`), will prune (eligible now) or skipped."""
    planned = {lp.name: lp for lp in plan.layers} if plan is not None else {}
    skipped = {s.name: s.reason for s in plan.skipped} if plan is not None else {}
    rows: list[LayerRow] = []
    for layer in layers:
        c_out, c_in, kernel, params = _shape(model, layer)
        matrix = info.smoothness.get(layer.name)
        mean = float(matrix.mean()) if matrix is not None and matrix.size else None
        macs = info.cost.layer_macs.get(layer.name)
        after = cost_after.layer_macs.get(layer.name) if cost_after is not None else None
        if layer.name in planned:
            lp = planned[layer.name]
            status, reason, ratio, kept = PRUNED, None, lp.achieved_ratio, lp.kept
        elif plan is not None:
            status, reason, ratio, kept = SKIPPED, skipped.get(layer.name, layer.reason or "not in the plan"), None, None
        elif layer.eligible:
            status, reason, ratio, kept = WILL_PRUNE, None, layer.achieved_ratio, layer.kept
        else:
            status, reason, ratio, kept = SKIPPED, layer.reason, None, None
        rows.append(LayerRow(layer.name, c_out, c_in, kernel, params, macs, mean, status, reason, ratio, kept, after))
    return rows


def human_count(value: float) -> str:
    """1234567 → "1.23 M"; small numbers as they are."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:g}"


def summary_lines(ws: "Workspace", info: ModelInfo, rows: list[LayerRow]) -> list[tuple[str, str]]:
    """Label/value lines of the model overview."""
    data = ws.data
    checkpoint = ws.checkpoint
    shape = "×".join(str(d) for d in ws.input_shape[1:])
    sizes = "/".join(str(len(s)) for s in (data.train, data.val, data.test))  # type: ignore[arg-type]
    counts = {status: sum(r.status == status for r in rows) for status in (WILL_PRUNE, PRUNED, SKIPPED)}
    layers = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    source = "bundled sample" if ws.is_sample else checkpoint.source_format
    pruned = ", pruned checkpoint" if checkpoint.plan else ""
    return [
        ("Model", checkpoint.arch.describe()),
        ("File", f"{checkpoint.path.name} ({source}{pruned}) on {ws.device}"),
        ("Cost", f"{human_count(info.cost.params)} params · {human_count(info.cost.macs)} MACs at {shape} · "
                 f"{len(rows)} convs: {layers}"),
        ("Data", f"{data.name}: {data.num_classes} classes, {data.image_size}×{data.image_size}×{data.in_channels}, "
                 f"{sizes} train/val/test"),
        ("Norm", f"{ws.normalization.describe()} — {ws.normalization_source}"),
    ]
