"""The pruning orchestrator: plan_pruning runs Stage 1 (filter grouping) and Stage 2
(grouped-kernel selection) on every eligible conv and returns the PrunePlan, streaming
decision-trace events as it goes. Its settings are `prune_config.PruneConfig`."""

from __future__ import annotations

import dataclasses
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..common.errors import CheckpointError, SnapshotError
from ..common.memory import collection_paused
from ..common.progress import Progress, ProgressCallback, check_cancel, report
from .clustering import SchemeGroups, cluster_filters, flatten_filters
from .grouping import magnitude_snaking, random_grouping, smoothness_snaking
from .layers import ConvLayer, discover_layers
from .plan import LayerPlan, PrunePlan, SkippedLayer
from .prune_config import CLUSTER_PREFIX, PruneConfig
from .selection import (
    Choice,
    Group,
    GroupContext,
    greedy_many,
    grouped_kernels,
    kernel_distances,
    l2_select,
    least_smooth_select,
    random_select,
    smooth_beam_many,
)
from .smoothness import kernel_smoothness
from .tmi import tmi_filter_scores, tmi_grouping
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

_WINDOW_ELEMENTS = 1 << 21  # distance-matrix entries of the groups one window searches together


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


def _ticket_snapshots(config: PruneConfig, snapshots: Mapping[int, Mapping[str, torch.Tensor]] | None) -> list[int]:
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


def _ticket_scores(layers: list[ConvLayer], weights: dict[str, torch.Tensor], epochs: list[int],
                   snapshots: Mapping[int, Mapping[str, torch.Tensor]], progress: ProgressCallback | None,
                   cancel: threading.Event | None) -> dict[str, np.ndarray]:
    """Per layer, the TMI score of every filter at every ticket epoch `(T, C_out)`, from one pass
    over the snapshots that asks for each once (a lazy source then holds one at a time); each
    layer's weight is checked for presence, shape and finiteness."""
    finals = {layer.name: flatten_filters(weights[layer.name]) for layer in layers}
    scores = {layer.name: np.empty((len(epochs), layer.out_channels)) for layer in layers}
    for row, epoch in enumerate(epochs):
        check_cancel(cancel)
        report(progress, Progress("tickets", row, len(epochs), f"epoch {epoch}"))
        for name, score in _scores_at(epoch, snapshots[epoch], finals, weights).items():
            scores[name][row] = score
    report(progress, Progress("tickets", len(epochs), len(epochs), "done"))
    return scores


def _scores_at(epoch: int, state: Mapping[str, torch.Tensor], finals: dict[str, np.ndarray],
               weights: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every layer's filter TMI scores at one ticket epoch (the snapshot is let go on return)."""
    scores = {}
    for name, final in finals.items():
        key, shape = f"{name}.weight", tuple(weights[name].shape)
        weight = state.get(key)
        if weight is None:
            raise SnapshotError(f"the snapshot of epoch {epoch} has no weight {key!r}")
        if tuple(weight.shape) != shape:
            raise SnapshotError(f"the snapshot of epoch {epoch} has {key} of shape {tuple(weight.shape)}, the model {shape}")
        ticket = flatten_filters(weight)
        if not np.isfinite(ticket).all():
            raise SnapshotError(f"the snapshot of epoch {epoch} has NaN or infinite values in {key}")
        scores[name] = tmi_filter_scores(final, ticket[None])[0]
    return scores


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
    ticket_scores: np.ndarray | None
    tracer: Tracer | None

    @property
    def array(self) -> np.ndarray:
        return self.weight.numpy()


def _grouping(layer: ConvLayer, config: PruneConfig) -> str:
    return "magnitude-snaking" if _pointwise(layer) else config.resolved_grouping


def _clusterings(job: _LayerJob, grouping: str, config: PruneConfig) -> list[SchemeGroups]:
    """The clusterings Stage 1 of this layer uses: every TMI scheme's, or the forced scheme's."""
    seed = _seed(config.seed, job.layer.name, 1)
    if grouping == "tmi":
        schemes = [(scheme, seed + index) for index, scheme in enumerate(config.tmi_schemes)]
    else:
        schemes = [(grouping[len(CLUSTER_PREFIX):], seed)]
    return [cluster_filters(job.weight, scheme, config.groups, scheme_seed) for scheme, scheme_seed in schemes]


def _group_filters(job: _LayerJob, grouping: str, config: PruneConfig) -> tuple[list[list[int]], str]:
    """Stage 1 for one layer: the filter groups and the grouping actually used."""
    name, tracer, n = job.layer.name, job.tracer, config.groups
    if grouping in ("smoothness-snaking", "magnitude-snaking"):
        smooth = grouping == "smoothness-snaking"
        deal = smoothness_snaking(job.heat, n) if smooth else magnitude_snaking(job.weight, n)
        if tracer is not None:
            tracer.emit(SnakeDeal(name, "smoothness" if smooth else "magnitude", not smooth, tuple(deal.order),
                                  tuple(deal.values), tuple(deal.group_of_rank)))
        return deal.filter_groups, grouping
    if grouping == "random":
        groups = random_grouping(job.layer.out_channels, n, _rng(config.seed, name, 0))
        if tracer is not None:
            tracer.emit(RandomGrouping(name, tuple(tuple(g) for g in groups)))
        return groups, grouping
    found = _clusterings(job, grouping, config)
    if grouping.startswith(CLUSTER_PREFIX):
        (result,) = found
        if tracer is not None:
            tracer.emit(Clustering(name, result.scheme, tuple(tuple(g) for g in result.filter_groups), result.eps,
                                   result.raw_clusters))
        return result.filter_groups, grouping
    assert job.ticket_scores is not None
    chosen = tmi_grouping(found, config.ticket_epochs, job.ticket_scores, alpha=config.tmi_alpha,
                          weighting=config.compat, layer=name, tracer=tracer)
    return chosen.filter_groups, f"tmi:{chosen.scheme}"


def _group_smoothness(job: _LayerJob, filters: list[int]) -> np.ndarray:
    """Grouped-kernel smoothness of one group: the heatmap summed over the group's filters."""
    return job.heat[filters].sum(axis=0)


@dataclass
class _Staged:
    """A layer after Stage 1: its groups and the events so far; Stage 2 adds each group's choice
    and events."""

    job: _LayerJob
    grouping: str
    filter_groups: list[list[int]]
    events: list[TraceEvent]
    group_events: list[list[TraceEvent]]
    choices: list[Choice] | None = None


def _stage_one(job: _LayerJob, config: PruneConfig, stream: bool) -> _Staged:
    """Stage 1 of one layer, its events kept for later (or, when `stream`, emitted now)."""
    layer, tracer = job.layer, job.tracer
    grouping = _grouping(layer, config)
    events: list[TraceEvent] = []
    if tracer is not None and not stream:
        job = dataclasses.replace(job, tracer=Tracer(events.append, tracer.level))
    if job.tracer is not None:
        job.tracer.emit(LayerStart(layer.name, layer.out_channels, layer.in_channels, layer.kernel_size,
                                   config.groups, layer.kept, grouping, config.resolved_selection,  # type: ignore[arg-type]
                                   config.compat))
    filter_groups, used = _group_filters(job, grouping, config)
    return _Staged(dataclasses.replace(job, tracer=tracer), used, filter_groups, events,
                   [[] for _ in filter_groups])


def _context(staged: _Staged, g: int, stream: bool) -> GroupContext | None:
    tracer = staged.job.tracer
    if tracer is None:
        return None
    return GroupContext(tracer if stream else Tracer(staged.group_events[g].append, tracer.level),
                        staged.job.layer.name, g)


def _stage_two(window: list[_Staged], config: PruneConfig, stream: bool, cancel: threading.Event | None) -> None:
    """Stage 2 of a window of layers of one shape: the beam or greedy searches of all their groups
    run together."""
    selection, reference = config.resolved_selection, config.compat == "reference"
    if selection in ("smooth-beam", "greedy"):
        groups = [
            Group(kernel_distances(grouped_kernels(s.job.array, filters)),
                  _group_smoothness(s.job, filters) if selection == "smooth-beam" else None, _context(s, g, stream))
            for s in window for g, filters in enumerate(s.filter_groups)
        ]
        kept = window[0].job.layer.kept
        assert kept is not None
        if selection == "smooth-beam":
            choices = smooth_beam_many(
                groups, kept, beam_width=config.beam_width, check_every=config.check_every, alpha=config.csb_alpha,
                freeze_beta=reference, cut_at_final=reference, cancel=cancel,
            )
        else:
            choices = greedy_many(groups, kept, gamma_ratio=config.gamma_ratio, beta=config.beta,
                                  floor_gamma=not reference, cancel=cancel)
        for s in window:
            s.choices, choices = choices[: len(s.filter_groups)], choices[len(s.filter_groups):]
        return
    for s in window:
        job, kept, name = s.job, s.job.layer.kept, s.job.layer.name
        assert kept is not None
        s.choices = []
        for g, filters in enumerate(s.filter_groups):
            check_cancel(cancel)
            context = _context(s, g, stream)
            if selection == "l2":
                s.choices.append(l2_select(grouped_kernels(job.array, filters), kept, context))
            elif selection == "least-smooth":
                s.choices.append(least_smooth_select(_group_smoothness(job, filters), kept, context))
            else:
                s.choices.append(random_select(job.layer.in_channels, kept, _rng(config.seed, name, 2, g), context))


def _finish_layer(staged: _Staged, config: PruneConfig, cancel: threading.Event | None) -> LayerPlan:
    """Emit a layer's kept events group by group and return its plan."""
    layer, tracer, choices = staged.job.layer, staged.job.tracer, staged.choices
    assert choices is not None
    if tracer is not None:
        for event in staged.events:
            tracer.emit(event)
        for events in staged.group_events:
            check_cancel(cancel)
            for event in events:
                tracer.emit(event)
    scores = [c.score for c in choices]
    score = None if any(s is None for s in scores) else float(sum(scores))  # type: ignore[arg-type]
    plan = LayerPlan(layer.name, layer.out_channels, layer.in_channels, layer.kernel_size, staged.filter_groups,
                     [c.kept for c in choices], staged.grouping, config.resolved_selection, score)
    plan.check()
    if tracer is not None:
        tracer.emit(LayerDone(layer.name, staged.grouping, config.resolved_selection,
                              tuple(tuple(g) for g in staged.filter_groups),
                              tuple(tuple(c.kept) for c in choices), plan.achieved_ratio, score))
    return plan


def _windows(layers: list[ConvLayer], config: PruneConfig, stream: bool) -> list[list[ConvLayer]]:
    """Runs of consecutive layers whose eligible ones share C_in and S, so their groups search
    together; a run holds at most `_WINDOW_ELEMENTS` of distance matrices. When events stream
    (a `full` trace) a run ends at each eligible layer, so events keep their order."""
    windows: list[list[ConvLayer]] = [[]]
    key, elements = None, 0
    for layer in layers:
        if stream and key is not None:
            windows.append([])
            key = None
        if layer.eligible:
            size = config.groups * layer.in_channels ** 2
            if key is not None and (key != (layer.in_channels, layer.kept) or elements + size > _WINDOW_ELEMENTS):
                windows.append([])
                elements = 0
            key, elements = (layer.in_channels, layer.kept), elements + size
        windows[-1].append(layer)
    return [w for w in windows if w]


def plan_pruning(
    model: nn.Module,
    config: PruneConfig,
    *,
    snapshots: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    arch: dict | None = None,
    on_event: Callable[[TraceEvent], None] | None = None,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
) -> PrunePlan:
    """Plan GKP for every eligible conv of `model` (SPEC §1-4): same config and seed, same plan.
    TMI grouping needs `snapshots` (epoch -> state dict) covering the ticket window."""
    config.validate()
    with collection_paused():
        return _plan(model, config, snapshots, arch, on_event, progress, cancel)


def _plan(model: nn.Module, config: PruneConfig, snapshots: Mapping[int, Mapping[str, torch.Tensor]] | None,
          arch: dict | None, on_event: Callable[[TraceEvent], None] | None, progress: ProgressCallback | None,
          cancel: threading.Event | None) -> PrunePlan:
    layers = discover_layers(model, groups=config.groups, rate=config.rate, compat=config.compat,  # type: ignore[arg-type]
                             skip_stem=config.skip_stem, include_pointwise=config.include_pointwise,
                             exclude=config.exclude)
    eligible = [layer for layer in layers if layer.eligible]
    needs_tickets = config.resolved_grouping == "tmi" and not all(_pointwise(layer) for layer in eligible)
    epochs = _ticket_snapshots(config, snapshots) if needs_tickets else []
    modules = dict(model.named_modules())
    ticketed = [layer for layer in eligible if epochs and not _pointwise(layer)]
    ticket_scores = _ticket_scores(ticketed, {layer.name: _layer_weight(layer.name, modules[layer.name])
                                              for layer in ticketed}, epochs, snapshots, progress, cancel) if ticketed else {}  # type: ignore[arg-type]
    tracer = None if on_event is None else Tracer(on_event, config.trace_level)
    stream = tracer is not None and tracer.full
    planned: list[LayerPlan] = []
    skipped: list[SkippedLayer] = []
    for window in _windows(layers, config, stream):
        check_cancel(cancel)
        staged: dict[str, _Staged] = {}
        for layer in window:
            if not layer.eligible:
                if stream and tracer is not None:
                    tracer.emit(LayerSkipped(layer.name, layer.reason or "not eligible"))
                continue
            report(progress, Progress("prune", len(planned) + len(staged), len(eligible), layer.name))
            weight = _layer_weight(layer.name, modules[layer.name])
            heat = kernel_smoothness(weight, config.smoothness_power).numpy()
            job = _LayerJob(layer, weight, heat, ticket_scores.get(layer.name), tracer)
            staged[layer.name] = _stage_one(job, config, stream)
            check_cancel(cancel)
        if staged:
            _stage_two(list(staged.values()), config, stream, cancel)
        for layer in window:
            if layer.eligible:
                planned.append(_finish_layer(staged[layer.name], config, cancel))
                continue
            skipped.append(SkippedLayer(layer.name, layer.reason or "not eligible"))
            if tracer is not None and not stream:
                tracer.emit(LayerSkipped(layer.name, layer.reason or "not eligible"))
    report(progress, Progress("prune", len(planned), len(eligible), "done"))
    return PrunePlan(method=config.method, params=config.params(), layers=planned, skipped=skipped, arch=arch)
