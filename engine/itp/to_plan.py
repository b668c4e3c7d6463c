"""Frozen masks to a pruning plan, so deployment, evaluation, traces and the TUI treat in-train
pruning like any other method: grouped-kernel masks become GKP layers (dense grouped convs),
channel masks one-group GKP layers (the masked input channels are gathered away, a physically
smaller conv), kernel and weight masks zeroed-weight layers (`PrunePlan.masks`)."""

from __future__ import annotations

from typing import Any

import torch

from ..gkp.plan import LayerPlan, MaskLayer, PrunePlan, SkippedLayer
from ..gkp.traces import LayerDone
from .masks import MaskedConv

ITP_SELECTION = "itp-mask"


def _kept(row: torch.Tensor) -> list[int]:
    return torch.nonzero(row > 0.5).flatten().tolist()


def masks_to_plan(
    layers: dict[str, MaskedConv],
    filter_groups: dict[str, list[list[int]]],
    grouping: str,
    params: dict[str, Any],
    skipped: list[SkippedLayer],
    arch: dict[str, Any] | None,
) -> tuple[PrunePlan, list[LayerDone]]:
    """The plan of the frozen binary masks (method `itp`), and a `layer_done` event per GKP layer."""
    plan = PrunePlan(method="itp", params=params, layers=[], skipped=list(skipped), arch=arch)
    done = []
    for name, layer in layers.items():
        binary, shape = layer.binary, tuple(layer.weight.shape)
        if layer.granularity in ("grouped-kernel", "channel"):
            groups = filter_groups[name] if layer.granularity == "grouped-kernel" else [list(range(shape[0]))]
            rows = binary if layer.granularity == "grouped-kernel" else binary[None]
            entry = LayerPlan(name, shape[0], shape[1], (shape[2], shape[3]), [list(g) for g in groups],
                              [_kept(row) for row in rows],
                              grouping if layer.granularity == "grouped-kernel" else "single-group", ITP_SELECTION)
            entry.check()
            plan.layers.append(entry)
            done.append(LayerDone(name, entry.grouping, ITP_SELECTION, tuple(tuple(g) for g in entry.filter_groups),
                                  tuple(tuple(k) for k in entry.kept_channels), entry.achieved_ratio, None))
        else:
            plan.masks.append(MaskLayer.from_keep(name, layer.granularity, shape, binary > 0.5))
    return plan, done
