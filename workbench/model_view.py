"""What the workbench screens show about an opened model, as plain data: the summary lines, the
per-layer table rows and each conv's kernel-smoothness matrix. `model_scan` computes it with the
engine in a worker; this module stays free of torch so the first screen draws before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sample_models import is_sample

if TYPE_CHECKING:
    from engine.data.datasets import DataBundle
    from engine.formats.listing import CheckpointIndex
    from engine.gkp.layers import ConvLayer
    from engine.gkp.plan import PrunePlan
    from engine.models.metrics import ModelCost
    from engine.pipeline import Workspace

WILL_PRUNE, PRUNED, SKIPPED, OPENING = "will prune", "pruned", "skipped", "opening…"


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
    every conv, its parameter count as it is now and its dense input channels (a pruned layer's
    original C_in), the C_out × C_in kernel-smoothness matrix of its dense weights (float32, for
    drawing) and each filter's smoothness (float64, the values snaking sorts by)."""

    cost: ModelCost
    params: dict[str, int] = field(default_factory=dict)
    in_channels: dict[str, int] = field(default_factory=dict)
    smoothness: dict[str, np.ndarray] = field(default_factory=dict)
    filter_smoothness: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def layer_rows(
    layers: list[ConvLayer],
    info: ModelInfo,
    plan: PrunePlan | None,
    cost_after: ModelCost | None = None,
) -> list[LayerRow]:
    """Table rows for every conv: pruned (in `plan`: a GKP layer, a zeroed-weight mask or removed
    filters), will prune (eligible now) or skipped."""
    planned = {lp.name: lp for lp in plan.layers} if plan is not None else {}
    others: dict[str, float] = {} if plan is None else {
        **{m.name: m.pruned_share for m in plan.masks},
        **{f.name: 1 - len(f.kept) / f.out_channels for f in plan.filters},
    }
    skipped = {s.name: s.reason for s in plan.skipped} if plan is not None else {}
    rows: list[LayerRow] = []
    for layer in layers:
        matrix = info.smoothness.get(layer.name)
        mean = float(matrix.mean()) if matrix is not None and matrix.size else None
        macs = info.cost.layer_macs.get(layer.name)
        after = cost_after.layer_macs.get(layer.name) if cost_after is not None else None
        if layer.name in planned:
            lp = planned[layer.name]
            status, reason, ratio, kept = PRUNED, None, lp.achieved_ratio, lp.kept
        elif layer.name in others:
            status, reason, ratio, kept = PRUNED, None, others[layer.name], None
        elif plan is not None:
            status, reason, ratio, kept = SKIPPED, skipped.get(layer.name, layer.reason or "not in the plan"), None, None
        elif layer.eligible:
            status, reason, ratio, kept = WILL_PRUNE, None, layer.achieved_ratio, layer.kept
        else:
            status, reason, ratio, kept = SKIPPED, layer.reason, None, None
        rows.append(LayerRow(layer.name, layer.out_channels, info.in_channels[layer.name], layer.kernel_size,
                             info.params[layer.name], macs, mean, status, reason, ratio, kept, after))
    return rows


def listed_rows(listing: "CheckpointIndex") -> list[LayerRow]:
    """Rows for every conv weight of a checkpoint listed before torch has loaded: names, shapes and
    parameters only (a pruned layer shows its dense input channels from the stored plan)."""
    dense_in = {lp["name"]: lp["in_channels"] for lp in (listing.plan or {}).get("layers", [])
                if isinstance(lp, dict) and "name" in lp and "in_channels" in lp}
    return [
        LayerRow(conv.name, conv.shape[0], int(dense_in.get(conv.name, conv.shape[1])), conv.shape[2:],
                 conv.params, None, None, OPENING, None, None, None)
        for conv in listing.convs()
    ]


def human_count(value: float) -> str:
    """1234567 → "1.23 M"; small numbers as they are."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:g}"


def summary_lines(ws: "Workspace", info: ModelInfo, rows: list[LayerRow], data_note: str = "") -> list[tuple[str, str]]:
    """Label/value lines of the model overview; `data_note` says why there is no data, or what
    loading it did to the images."""
    checkpoint = ws.checkpoint
    shape = "×".join(str(d) for d in ws.input_shape[1:])
    counts = {status: sum(r.status == status for r in rows) for status in (WILL_PRUNE, PRUNED, SKIPPED)}
    layers = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    source = "bundled sample" if is_sample(checkpoint.path) else checkpoint.source_format
    pruned = ", pruned checkpoint" if checkpoint.plan else ""
    return [
        ("Model", checkpoint.arch.describe()),
        ("File", f"{checkpoint.path.name} ({source}{pruned}) on {ws.device}"),
        ("Cost", f"{human_count(info.cost.params)} params · {human_count(info.cost.macs)} MACs at {shape} · "
                 f"{len(rows)} convs: {layers}"),
        ("Data", data_line(ws.data, data_note)),
        ("Norm", f"{ws.normalization.describe()} — {ws.normalization_source}"),
    ]


def data_line(data: "DataBundle | None", note: str = "") -> str:
    """The dataset in one line, or why there is none."""
    if data is None:
        return note or "loading …"
    sizes = "/".join(str(len(s)) for s in (data.train, data.val, data.test))  # type: ignore[arg-type]
    scaled = f" ({note})" if note else ""
    return (f"{data.name}: {data.num_classes} classes, {data.image_size}×{data.image_size}×{data.in_channels}{scaled}, "
            f"{sizes} train/val/test")
