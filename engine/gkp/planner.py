"""The pruning orchestrator: plan_pruning runs Stage 1 (filter grouping) and Stage 2
(grouped-kernel selection) on every eligible conv and returns the PrunePlan, streaming
decision-trace events as it goes. Its settings are `prune_config.PruneConfig`."""

from __future__ import annotations

import os
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..common.errors import CheckpointError, SnapshotError
from ..common.progress import Progress, ProgressCallback, check_cancel, report
from .grouping import magnitude_snaking, random_grouping, smoothness_snaking
from .layers import ConvLayer, discover_layers
from .plan import LayerPlan, PrunePlan, SkippedLayer
from .prune_config import CLUSTER_PREFIX, PruneConfig
from .selection import (
    Choice,
    GroupContext,
    greedy_select,
    grouped_kernels,
    kernel_distances,
    l2_select,
    least_smooth_select,
    random_select,
    smooth_beam_select,
)
from .smoothness import kernel_smoothness
from .tmi import cluster_filters, tmi_grouping
from .traces import (
    Clustering,
    LayerDone,
    LayerSkipped,
    LayerStart,
    RandomGrouping,
    SnakeDeal,
    TraceEvent,
    Tracer,
)


def _epochs_text(epochs: Sequence[int]) -> str:
    """`0-30, 40, 50-52` for a sorted list of epochs."""
    parts: list[str] = []
    start = prev = None
    for epoch in [*epochs, None]:
        if prev is not None and epoch == prev + 1:
            prev = epoch
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = epoch
    return ", ".join(parts) or "none"


def _ticket_snapshots(config: PruneConfig, snapshots: dict[int, dict[str, torch.Tensor]] | None) -> list[int]:
    """The ticket epochs, after checking the snapshots cover all of them."""
    epochs = config.ticket_epochs
    first, last = config.ticket_window
    if not snapshots:
        raise SnapshotError(
            f"TMI-GKP needs training snapshots (the weights at epochs {first}-{last} of the ticket "
            "window), but none were given"
        )
    missing = [e for e in epochs if e not in snapshots]
    if missing:
        raise SnapshotError(
            f"the ticket window {first}-{last} needs snapshots of epochs {_epochs_text(missing)}, "
            f"but only epochs {_epochs_text(sorted(snapshots))} were found"
        )
    return epochs


def _layer_tickets(name: str, shape: torch.Size, epochs: list[int],
                   snapshots: dict[int, dict[str, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """The layer's weight at every ticket epoch, checked for presence, shape and finiteness."""
    key = f"{name}.weight"
    tickets = []
    for epoch in epochs:
        weight = snapshots[epoch].get(key)
        if weight is None:
            raise SnapshotError(f"the snapshot of epoch {epoch} has no weight {key!r}")
        if tuple(weight.shape) != tuple(shape):
            raise SnapshotError(
                f"the snapshot of epoch {epoch} has {key} of shape {tuple(weight.shape)}, the model {tuple(shape)}"
            )
        if not np.isfinite(weight.detach().cpu().numpy()).all():
            raise SnapshotError(f"the snapshot of epoch {epoch} has NaN or infinite values in {key}")
        tickets.append((epoch, weight))
    return tickets


def _layer_weight(name: str, module: nn.Module) -> torch.Tensor:
    """The conv's weight as a float64 CPU tensor; `CheckpointError` if it is not finite."""
    array = module.weight.detach().cpu().numpy().astype(np.float64)
    if not np.isfinite(array).all():
        raise CheckpointError(f"layer {name} has NaN or infinite weights, so its kernels cannot be ranked")
    return torch.from_numpy(array)


def _pointwise(layer: ConvLayer) -> bool:
    return layer.kernel_size == (1, 1)


def _rng(seed: int, layer: str, *keys: int) -> np.random.Generator:
    """A generator fixed by the seed, the layer name and the purpose `keys`."""
    return np.random.default_rng([seed, zlib.crc32(layer.encode("utf-8")), *keys])


def _seed(seed: int, layer: str, *keys: int) -> int:
    return int(_rng(seed, layer, *keys).integers(2**31))


@dataclass
class _LayerJob:
    """What pruning one layer needs."""

    layer: ConvLayer
    weight: torch.Tensor
    heat: np.ndarray
    tickets: list[tuple[int, torch.Tensor]]
    tracer: Tracer | None

    @property
    def array(self) -> np.ndarray:
        return self.weight.numpy()


def _group_filters(job: _LayerJob, grouping: str, config: PruneConfig) -> tuple[list[list[int]], str]:
    """Stage 1 for one layer: the filter groups and the grouping actually used."""
    name, weight, tracer, n = job.layer.name, job.weight, job.tracer, config.groups
    if grouping in ("smoothness-snaking", "magnitude-snaking"):
        smooth = grouping == "smoothness-snaking"
        deal = smoothness_snaking(job.heat, n) if smooth else magnitude_snaking(weight, n)
        if tracer is not None:
            tracer.emit(SnakeDeal(name, "smoothness" if smooth else "magnitude", not smooth, tuple(deal.order),
                                  tuple(deal.values), tuple(deal.group_of_rank)))
        return deal.filter_groups, grouping
    if grouping == "random":
        groups = random_grouping(job.layer.out_channels, n, _rng(config.seed, name, 0))
        if tracer is not None:
            tracer.emit(RandomGrouping(name, tuple(tuple(g) for g in groups)))
        return groups, grouping
    if grouping.startswith(CLUSTER_PREFIX):
        scheme = grouping[len(CLUSTER_PREFIX):]
        found = cluster_filters(weight, scheme, n, _seed(config.seed, name, 1))
        if tracer is not None:
            tracer.emit(Clustering(name, scheme, tuple(tuple(g) for g in found.filter_groups), found.eps,
                                   found.raw_clusters))
        return found.filter_groups, grouping
    chosen = tmi_grouping(weight, job.tickets, n, schemes=config.tmi_schemes, seed=_seed(config.seed, name, 1),
                          alpha=config.tmi_alpha, weighting=config.compat, layer=name, tracer=tracer)
    return chosen.filter_groups, f"tmi:{chosen.scheme}"


def _group_smoothness(job: _LayerJob, filters: list[int]) -> np.ndarray:
    """Grouped-kernel smoothness of one group: the heatmap summed over the group's filters."""
    return job.heat[filters].sum(axis=0)


def _select(job: _LayerJob, selection: str, config: PruneConfig, filter_groups: list[list[int]],
            cancel: threading.Event | None) -> list[Choice]:
    """Stage 2 for one layer: each group's kept grouped kernels. Groups run on a thread per core
    (numpy releases the GIL in the heavy array work) and their events are emitted from the
    calling thread in group order; a `full` trace runs them in turn so its volume streams."""
    jobs = list(enumerate(filter_groups))
    if job.tracer is not None and job.tracer.full:
        return [_select_group(job, selection, config, g, filters, cancel)[0] for g, filters in jobs]
    choices = []
    with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        futures = [pool.submit(_select_group, job, selection, config, g, filters, cancel) for g, filters in jobs]
        try:
            for future in futures:
                choice, events = future.result()
                check_cancel(cancel)
                for event in events:
                    job.tracer.emit(event)  # type: ignore[union-attr]
                choices.append(choice)
        finally:
            for future in futures:
                future.cancel()
    return choices


def _select_group(job: _LayerJob, selection: str, config: PruneConfig, g: int, filters: list[int],
                  cancel: threading.Event | None) -> tuple[Choice, list[TraceEvent]]:
    """One group's choice and its events (streamed straight to a `full` tracer, else returned)."""
    check_cancel(cancel)
    events: list[TraceEvent] = []
    context = None
    if job.tracer is not None:
        sink = job.tracer if job.tracer.full else Tracer(events.append, job.tracer.level)
        context = GroupContext(sink, job.layer.name, g)
    kept, name = job.layer.kept, job.layer.name
    assert kept is not None
    if selection == "smooth-beam":
        choice = smooth_beam_select(
            kernel_distances(grouped_kernels(job.array, filters)), _group_smoothness(job, filters), kept,
            beam_width=config.beam_width, check_every=config.check_every, alpha=config.csb_alpha,
            freeze_beta=config.compat == "reference", context=context, cancel=cancel,
        )
    elif selection == "greedy":
        choice = greedy_select(kernel_distances(grouped_kernels(job.array, filters)), kept,
                               gamma_ratio=config.gamma_ratio, beta=config.beta, context=context, cancel=cancel)
    elif selection == "l2":
        choice = l2_select(grouped_kernels(job.array, filters), kept, context)
    elif selection == "least-smooth":
        choice = least_smooth_select(_group_smoothness(job, filters), kept, context)
    else:
        choice = random_select(job.layer.in_channels, kept, _rng(config.seed, name, 2, g), context)
    return choice, events


def _prune_layer(job: _LayerJob, config: PruneConfig, cancel: threading.Event | None) -> LayerPlan:
    layer, tracer = job.layer, job.tracer
    grouping = "magnitude-snaking" if _pointwise(layer) else config.resolved_grouping
    selection = config.resolved_selection
    if tracer is not None:
        tracer.emit(LayerStart(layer.name, layer.out_channels, layer.in_channels, layer.kernel_size,
                               config.groups, layer.kept, grouping, selection, config.compat))  # type: ignore[arg-type]
    filter_groups, used = _group_filters(job, grouping, config)
    choices = _select(job, selection, config, filter_groups, cancel)
    scores = [c.score for c in choices]
    score = None if any(s is None for s in scores) else float(sum(scores))  # type: ignore[arg-type]
    plan = LayerPlan(layer.name, layer.out_channels, layer.in_channels, layer.kernel_size, filter_groups,
                     [c.kept for c in choices], used, selection, score)
    plan.check()
    if tracer is not None:
        tracer.emit(LayerDone(layer.name, used, selection, tuple(tuple(g) for g in filter_groups),
                              tuple(tuple(c.kept) for c in choices), plan.achieved_ratio, score))
    return plan


def plan_pruning(
    model: nn.Module,
    config: PruneConfig,
    *,
    snapshots: dict[int, dict[str, torch.Tensor]] | None = None,
    arch: dict | None = None,
    on_event: Callable[[TraceEvent], None] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PrunePlan:
    """Plan GKP for every eligible conv of `model` (SPEC §1-4): same config and seed, same plan.
    TMI grouping needs `snapshots` (epoch -> state dict) covering the ticket window."""
    config.validate()
    layers = discover_layers(model, groups=config.groups, rate=config.rate, compat=config.compat,  # type: ignore[arg-type]
                             skip_stem=config.skip_stem, include_pointwise=config.include_pointwise,
                             exclude=config.exclude)
    eligible = [layer for layer in layers if layer.eligible]
    needs_tickets = config.resolved_grouping == "tmi" and not all(_pointwise(layer) for layer in eligible)
    epochs = _ticket_snapshots(config, snapshots) if needs_tickets else []
    tracer = None if on_event is None else Tracer(on_event, config.trace_level)
    modules = dict(model.named_modules())
    planned: list[LayerPlan] = []
    skipped: list[SkippedLayer] = []
    for layer in layers:
        check_cancel(cancel)
        if not layer.eligible:
            skipped.append(SkippedLayer(layer.name, layer.reason or "not eligible"))
            if tracer is not None:
                tracer.emit(LayerSkipped(layer.name, layer.reason or "not eligible"))
            continue
        report(progress, Progress("prune", len(planned), len(eligible), layer.name))
        weight = _layer_weight(layer.name, modules[layer.name])
        tickets = _layer_tickets(layer.name, weight.shape, epochs, snapshots) if epochs and not _pointwise(layer) else []  # type: ignore[arg-type]
        heat = kernel_smoothness(weight, config.smoothness_power).numpy()
        planned.append(_prune_layer(_LayerJob(layer, weight, heat, tickets, tracer), config, cancel))
    report(progress, Progress("prune", len(planned), len(eligible), "done"))
    return PrunePlan(method=config.method, params=config.params(), layers=planned, skipped=skipped, arch=arch)
