"""Freezing the learned masks (SPEC §8): grouped-kernel masks become equal counts per group (each
layer keeps `S = round(mean kept per group)`, every group its top-S by M), channel masks keep at
least one channel, and if the model's complexity then misses ψ* by more than the tolerance the
masks are completed to it, unit by unit in order of their learned values M (lowest M off first
when above the target, highest M on first when below), until the first unit that reaches it."""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .complexity import Complexity
from .masks import MaskedConv


@dataclass
class FreezeResult:
    """What freezing did: the complexity learned and reached, the whole-model relative error
    against the target (in the cost's measure), whether it is within the tolerance, and how many
    mask entries completion turned off and on."""

    learned: float
    achieved: float
    relative_error: float
    target_met: bool
    completed_off: int
    completed_on: int


def _equalise(layer: MaskedConv) -> None:
    """Grouped-kernel: every group keeps its top-S entries of M, S = round(mean kept), S >= 1;
    channel: at least the highest-M channel stays on."""
    with torch.no_grad():
        if layer.granularity == "grouped-kernel":
            groups, width = layer.binary.shape
            kept = max(1, int(torch.round(layer.binary.sum() / groups)))
            order = torch.sort(-layer.mask.detach(), dim=1, stable=True).indices[:, :kept]
            binary = torch.zeros_like(layer.binary)
            binary.scatter_(1, order, 1.0)
            layer.binary.copy_(binary)
        elif layer.granularity == "channel" and not bool(layer.binary.any()):
            layer.binary[int(torch.argmax(layer.mask.detach()))] = 1.0


def _units(layer: MaskedConv, off: bool) -> Iterator[tuple[float, list[int]]]:
    """The layer's completion units in order: (value of M, flat indices of the mask entries to
    flip). A unit is one entry, or for grouped-kernel masks one entry per group (S changes by one)."""
    mask = layer.mask.detach()
    binary = layer.binary
    state = binary > 0.5 if off else binary < 0.5
    if layer.granularity == "grouped-kernel":
        groups, width = binary.shape
        per_group = [torch.nonzero(state[g]).flatten().tolist() for g in range(groups)]
        for g, entries in enumerate(per_group):
            entries.sort(key=lambda c: (float(mask[g, c]), c) if off else (-float(mask[g, c]), c))
        limit = min(len(e) for e in per_group) - (1 if off else 0)
        for k in range(max(0, limit)):
            picks = [g * width + per_group[g][k] for g in range(groups)]
            yield sum(float(mask.view(-1)[i]) for i in picks) / groups, picks
        return
    flat = torch.nonzero(state.flatten()).flatten()
    values = mask.flatten()[flat]
    order = torch.sort(values if off else -values, stable=True).indices
    keep_one = layer.granularity == "channel" and off
    for i in order[: len(order) - 1 if keep_one else len(order)].tolist():
        yield float(values[i]), [int(flat[i])]


def freeze_masks(layers: dict[str, MaskedConv], complexity: Complexity, target: float, fixed_cost: float,
                 tolerance: float) -> FreezeResult:
    """Equalise, then complete to the target; leaves every layer not learning. The whole-model
    error is `(ψ − ψ*)·Σψ^0 / (fixed + ψ*·Σψ^0)`, `fixed` the cost outside the masked layers."""
    learned = float(complexity.relative())
    for layer in layers.values():
        layer.learning = False
        _equalise(layer)
    scale = complexity.total / (fixed_cost + target * complexity.total)
    linear = all(layer.granularity != "channel" for layer in layers.values())
    relative = float(complexity.relative())
    flipped = {True: 0, False: 0}
    for off in (True, False):
        error = (relative - target) * scale
        if (off and error <= tolerance) or (not off and error >= -tolerance):
            continue
        heap = []
        sources = {name: _units(layer, off) for name, layer in layers.items()}
        for position, (name, source) in enumerate(sources.items()):
            first = next(source, None)
            if first is not None:
                heap.append(((first[0] if off else -first[0]), position, name, first[1]))
        heapq.heapify(heap)
        while heap and (error > 0.0 if off else error < 0.0):
            _, position, name, picks = heapq.heappop(heap)
            layer = layers[name]
            with torch.no_grad():
                layer.binary.view(-1)[picks] = 0.0 if off else 1.0
            flipped[off] += len(picks)
            following = next(sources[name], None)
            if following is not None:
                heapq.heappush(heap, ((following[0] if off else -following[0]), position, name, following[1]))
            if linear:
                step = len(picks) * complexity.entry_cost(name) / complexity.total
                relative += -step if off else step
            else:
                relative = float(complexity.relative())
            error = (relative - target) * scale
    achieved = float(complexity.relative())
    error = (achieved - target) * scale
    return FreezeResult(learned, achieved, error, abs(error) <= tolerance, flipped[True], flipped[False])
