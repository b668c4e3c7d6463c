"""Stage 2 (SPEC §4): which grouped kernels each filter group keeps. TMI-GKP greedy with
restarts (Eq. 5), SR-GKP smooth beam greedy (Eq. 2, Eq. 3), and the ablation baselines.

The searches run in `search.py`, every restart of many groups at once; the `*_many` functions
take the groups of one shape together (the planner batches whole layers), split them into chunks
of bounded memory and run the chunks on a thread per core (numpy releases the GIL in the array
work). Beam-cut events are replayed for the lanes the trace shows: the winning start of each
group (`decisions`) or every start (`full`)."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import compress
from typing import TypeVar

import numpy as np
import torch
from scipy.spatial.distance import pdist, squareform

from .search import (
    Beam,
    Cut,
    Grown,
    Problems,
    gamma_outer,
    grow,
    pair_beta,
    to_fixed_point,
)
from .traces import (
    BeamCut,
    BeamFinal,
    FinalCandidate,
    FinalChoice,
    RankedSelection,
    StartResults,
    Tracer,
)

__all__ = [
    "Choice", "Group", "GroupContext", "gamma_count", "greedy_many", "greedy_select", "grouped_kernels",
    "kernel_distances", "l2_select", "least_smooth_select", "pair_beta", "random_select", "smooth_beam_many",
    "smooth_beam_select", "to_fixed_point",
]

_CHUNK_ELEMENTS = 1 << 20  # lanes x candidates x C_in per chunk: 8 MB per int64 array at most
_T = TypeVar("_T")


@dataclass(frozen=True)
class Choice:
    """The kernels a filter group keeps (ascending), with the winning start and its score
    (None for baselines)."""

    kept: list[int]
    score: float | None = None
    start: int | None = None


@dataclass(frozen=True)
class GroupContext:
    """Where a group's events go: the tracer, the layer and the group index."""

    tracer: Tracer
    layer: str
    group: int


@dataclass(frozen=True)
class Group:
    """One filter group's search problem: distances between its grouped kernels, their
    smoothness (the beam only) and where its events go."""

    distances: np.ndarray
    smoothness: np.ndarray | None = None
    context: GroupContext | None = None


def grouped_kernels(weight: torch.Tensor | np.ndarray, filters: list[int]) -> np.ndarray:
    """The grouped kernels of one filter group, one row per input channel: `(C_in, |g|*k*k)`."""
    array = weight if isinstance(weight, np.ndarray) else weight.detach().to(torch.float64).cpu().numpy()
    slab = array[filters]
    channels = slab.shape[1]
    return slab.swapaxes(0, 1).reshape(channels, slab.size // channels)


def kernel_distances(kernels: np.ndarray) -> np.ndarray:
    """Euclidean distance between every pair of grouped kernels, `(C_in, C_in)`."""
    return squareform(pdist(kernels))


def gamma_count(kept: int, gamma_ratio: float, floor: bool = True) -> int:
    """How many nearest kept kernels Eq. 5 sums per pruned kernel: `max(1, floor(ratio*S))`, or
    without the floor of 1 (`floor=False`, compat `reference`) `floor(ratio*S)`, which is 0 for
    small S."""
    count = math.floor(gamma_ratio * kept + 1e-9)  # 0.29 * 100 is 28.999... in floating point
    return max(1, count) if floor else count


def _check_kept(kept: int, channels: int) -> None:
    if not 1 <= kept <= channels:
        raise ValueError(f"cannot keep {kept} of {channels} grouped kernels")


def _parallel(tasks: list[Callable[[], _T]]) -> list[_T]:
    """Run `tasks` on a thread per core; results in task order."""
    if len(tasks) == 1:
        return [tasks[0]()]
    with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:  # pragma: no mutate (pool size)
        futures = [pool.submit(task) for task in tasks]
        try:
            return [future.result() for future in futures]
        finally:
            for future in futures:
                future.cancel()


def _lane_chunks(groups: int, channels: int, candidates: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every (group, start) lane, group-major, split so a chunk's `lanes x candidates x C_in`
    stays within the chunk budget."""
    owner = np.repeat(np.arange(groups), channels)
    starts = np.tile(np.arange(channels), groups)
    size = max(1, _CHUNK_ELEMENTS // (candidates * channels))
    return [(owner[lo:lo + size], starts[lo:lo + size]) for lo in range(0, len(owner), size)]


def _by_group(groups: int, channels: int, values: list[list[_T]]) -> list[list[_T]]:
    flat = [v for chunk in values for v in chunk]
    return [flat[g * channels:(g + 1) * channels] for g in range(groups)]


def smooth_beam_select(distances: np.ndarray, smoothness: np.ndarray, kept: int, *, beam_width: int = 2,
                       check_every: int = 3, alpha: float = 0.9, freeze_beta: bool = False,
                       cut_at_final: bool = False, context: GroupContext | None = None,
                       cancel: threading.Event | None = None) -> Choice:
    """SR-GKP Stage 2 for one group; see `smooth_beam_many`."""
    return smooth_beam_many([Group(distances, smoothness, context)], kept, beam_width=beam_width,
                            check_every=check_every, alpha=alpha, freeze_beta=freeze_beta,
                            cut_at_final=cut_at_final, cancel=cancel)[0]


def smooth_beam_many(groups: Sequence[Group], kept: int, *, beam_width: int = 2, check_every: int = 3,
                     alpha: float = 0.9, freeze_beta: bool = False, cut_at_final: bool = False,
                     cancel: threading.Event | None = None) -> list[Choice]:
    """SR-GKP Stage 2 for groups of one shape: a beam search from every start kernel, then per
    group the candidate with the highest Eq. 3 cost (`beta = C(S,2)/(C_in-S)`) over all starts,
    earliest on ties. Compat `reference`: `freeze_beta` uses the first cut's beta for every later
    cut and the final pick; `cut_at_final` also cuts at size S when it is a cut size."""
    channels = len(groups[0].distances)
    _check_kept(kept, channels)
    first_cut = check_every + 1
    frozen = pair_beta(min(first_cut, kept), channels) if freeze_beta else None  # S's own when no cut precedes S
    beam = Beam(kept, beam_width, check_every, alpha, frozen, cut_at_final)
    beta = beam.beta(kept, channels)
    problems = Problems.build([g.distances for g in groups], [g.smoothness for g in groups])  # type: ignore[misc]
    candidates = beam_width ** check_every * beam_width
    if any(g.context is not None and g.context.tracer.full for g in groups):
        return [_beam_full(problems, beam, beta, candidates, index, group, cancel)
                for index, group in enumerate(groups)]

    def run(owner: np.ndarray, starts: np.ndarray) -> tuple[list[list[int]], list[float]]:
        grown = grow(problems, beam, owner, starts, cancel=cancel)
        costs = _costs(grown, beta, problems.unit[owner])
        pick = costs.argmax(axis=1)
        lanes = np.arange(len(starts))
        return grown.members(pick[:, None])[:, 0].tolist(), costs[lanes, pick].tolist()

    done = _parallel([lambda o=o, s=s: run(o, s) for o, s in _lane_chunks(len(groups), channels, candidates)])
    members = _by_group(len(groups), channels, [m for m, _ in done])
    scores = _by_group(len(groups), channels, [s for _, s in done])
    winners = [int(np.argmax(s)) for s in scores]
    traced = [i for i, g in enumerate(groups) if g.context is not None]
    if traced:
        owner = np.array(traced)
        grown = grow(problems, beam, owner, np.array([winners[i] for i in traced]), record=True, cancel=cancel)
        costs = _costs(grown, beta, problems.unit[owner])
        pick = costs.argmax(axis=1)
        lanes = [(groups[i].context, problems.unit[i], problems.s_unit[i]) for i in traced]
        _emit_beams(grown, lanes, costs, pick, beta)  # type: ignore[arg-type]
    return [_finish(g.context, "smooth-beam", beta, 1, members[i], scores[i], winners[i])
            for i, g in enumerate(groups)]


def _costs(grown: Grown, beta: float, unit: np.ndarray) -> np.ndarray:
    """Eq. 3 of every complete candidate in real units."""
    return (grown.inner - beta * grown.outer) * unit[:, None]


def _beam_full(problems: Problems, beam: Beam, beta: float, candidates: int, index: int, group: Group,
               cancel: threading.Event | None) -> Choice:
    """One group with every start's beam events, start by start in chunks so the volume streams."""
    channels = problems.channels
    members: list[list[int]] = []
    scores: list[float] = []
    for _, starts in _lane_chunks(1, channels, candidates):
        owner = np.full(len(starts), index)
        grown = grow(problems, beam, owner, starts, record=True, cancel=cancel)
        costs = _costs(grown, beta, problems.unit[owner])
        pick = costs.argmax(axis=1)
        members.extend(grown.members(pick[:, None])[:, 0].tolist())
        scores.extend(costs[np.arange(len(starts)), pick].tolist())
        lanes = [(group.context, problems.unit[index], problems.s_unit[index])] * len(starts)
        _emit_beams(grown, lanes, costs, pick, beta)  # type: ignore[arg-type]
    return _finish(group.context, "smooth-beam", beta, 1, members, scores, int(np.argmax(scores)))


def greedy_select(distances: np.ndarray, kept: int, *, gamma_ratio: float = 0.2, beta: float | str = "auto",
                  floor_gamma: bool = True, context: GroupContext | None = None,
                  cancel: threading.Event | None = None) -> Choice:
    """TMI-GKP Stage 2 for one group; see `greedy_many`."""
    return greedy_many([Group(distances, None, context)], kept, gamma_ratio=gamma_ratio, beta=beta,
                       floor_gamma=floor_gamma, cancel=cancel)[0]


def greedy_many(groups: Sequence[Group], kept: int, *, gamma_ratio: float = 0.2, beta: float | str = "auto",
                floor_gamma: bool = True, cancel: threading.Event | None = None) -> list[Choice]:
    """TMI-GKP Stage 2 for groups of one shape (Algorithm 1 + Eq. 5): a greedy set from every
    start kernel, scored `inner - beta * sum over pruned of its gamma nearest kept distances`;
    the highest wins, the lowest start on ties. Without `floor_gamma` (compat `reference`)
    gamma may be 0, leaving the inner diversity alone (beta is then 0)."""
    channels = len(groups[0].distances)
    _check_kept(kept, channels)
    gamma = gamma_count(kept, gamma_ratio, floor_gamma)
    pruned = channels - kept
    if beta == "auto":
        beta = math.comb(kept, 2) / (pruned * gamma) if pruned and gamma else 0.0
    weight = float(beta)
    problems = Problems.build([g.distances for g in groups])

    def run(owner: np.ndarray, starts: np.ndarray) -> tuple[list[list[int]], list[float]]:
        grown = grow(problems, Beam(kept), owner, starts, cancel=cancel)
        sets = grown.members(np.zeros_like(starts)[:, None])[:, 0]
        if gamma == 0:
            outer = np.zeros(len(starts))
        elif gamma == 1:
            outer = grown.outer[:, 0]
        else:
            _, lane, inverse = np.unique(grown.final_state[:, 0], return_index=True, return_inverse=True)
            unique = gamma_outer(problems, owner[lane], sets[lane], gamma)
            outer = unique[inverse.ravel()]
        return sets.tolist(), ((grown.inner[:, 0] - weight * outer) * problems.unit[owner]).tolist()

    done = _parallel([lambda o=o, s=s: run(o, s) for o, s in _lane_chunks(len(groups), channels, 1)])
    members = _by_group(len(groups), channels, [m for m, _ in done])
    scores = _by_group(len(groups), channels, [s for _, s in done])
    return [_finish(g.context, "greedy", weight, gamma, members[i], scores[i], int(np.argmax(scores[i])))
            for i, g in enumerate(groups)]


def _finish(context: GroupContext | None, selection: str, beta: float, gamma: int,
            members: list[list[int]], scores: list[float], winner: int) -> Choice:
    """Emit every start's result and the final choice; return the choice."""
    choice = Choice(sorted(members[winner]), scores[winner], winner)
    if context is not None:
        emit = context.tracer.emit
        emit(StartResults(context.layer, context.group, selection, beta, gamma, tuple(range(len(scores))),
                          tuple(map(tuple, members)), tuple(scores)))
        emit(FinalChoice(context.layer, context.group, tuple(choice.kept), choice.score, choice.start))
    return choice


def _emit_beams(grown: Grown, lanes: Sequence[tuple[GroupContext, float, float]], costs: np.ndarray,
                pick: np.ndarray, beta: float) -> None:
    """Beam cut and final-candidate events of each lane of a recorded search; `lanes[row]` is
    the lane's context and its group's distance and smoothness units. Arrays become Python
    values once per cut, for all lanes together."""
    units = np.array([unit for _, unit, _ in lanes])[:, None]
    s_units = np.array([s_unit for _, _, s_unit in lanes])[:, None]
    cuts = [_CutColumns.of(cut, units, s_units) for cut in grown.cuts]
    finals = grown.members(np.broadcast_to(np.arange(grown.inner.shape[1]), grown.inner.shape)).tolist()
    final_costs, final_smooth = costs.tolist(), (grown.smooth * s_units).tolist()
    starts, best = grown.starts.tolist(), pick.tolist()
    for row, (context, _, _) in enumerate(lanes):
        emit, layer, group = context.tracer.emit, context.layer, context.group
        for c in cuts:
            first = c.first[row]
            emit(BeamCut(layer, group, starts[row], c.size, c.beta, tuple(map(tuple, c.prefixes[row])), c.prefix,
                         tuple(map(tuple, c.steps[row])), tuple(c.state[row]), *(
                             tuple(compress(column[row], first))
                             for column in (c.cost, c.smoothness, c.rank_cost, c.rank_smooth, c.score)
                         ), tuple(c.survivors[row])))
        emit(BeamFinal(layer, group, starts[row], beta, tuple(map(
            FinalCandidate, map(tuple, finals[row]), final_costs[row], final_smooth[row],
        )), best[row]))


@dataclass(frozen=True)
class _CutColumns:
    """A recorded cut as Python lists of `BeamCut`'s columns, one row per lane: per candidate its
    prefix, steps, set row (numbered by first appearance in the lane) and whether it is the
    first holding its set (whose values fill the per-set columns)."""

    size: int
    beta: float
    prefix: tuple[int, ...]
    prefixes: list[list[list[int]]]
    steps: list[list[list[int]]]
    state: list[list[int]]
    first: list[list[bool]]
    cost: list[list[float]]
    smoothness: list[list[float]]
    rank_cost: list[list[int]]
    rank_smooth: list[list[int]]
    score: list[list[float]]
    survivors: list[list[int]]

    @classmethod
    def of(cls, cut: Cut, units: np.ndarray, s_units: np.ndarray) -> _CutColumns:
        count = cut.state.shape[1]
        first = _first_equal(cut.state)
        is_first = first == np.arange(count)
        state = np.take_along_axis(np.cumsum(is_first, axis=1) - 1, first, axis=1)
        per_prefix = count // cut.prefix_count
        return cls(cut.size, cut.beta, tuple(i // per_prefix for i in range(count)),
                   cut.members[:, ::per_prefix, :cut.prefix_size].tolist(),
                   np.swapaxes(cut.members[:, :, cut.prefix_size:], 1, 2).tolist(), state.tolist(), is_first.tolist(),
                   (cut.cost_q * units).tolist(), (cut.smooth_q * s_units).tolist(), cut.rank_cost.tolist(),
                   cut.rank_smooth.tolist(), cut.score.tolist(), cut.keep.tolist())


def _first_equal(values: np.ndarray) -> np.ndarray:
    """Per row, the index of the first entry equal to each entry."""
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.ones(values.shape, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(values.shape[1]), 0), axis=1)
    first = np.empty_like(order)
    np.put_along_axis(first, order, np.take_along_axis(order, run_start, axis=1), axis=1)
    return first


def l2_select(kernels: np.ndarray, kept: int, context: GroupContext | None = None) -> Choice:
    """Baseline: keep the `kept` grouped kernels of largest L2 norm (lowest index on ties)."""
    norms = np.linalg.norm(kernels, axis=1)
    return _ranked(context, "l2", norms, np.lexsort([-norms])[:kept])  # lexsort is stable


def least_smooth_select(smoothness: np.ndarray, kept: int, context: GroupContext | None = None) -> Choice:
    """Baseline: prune the roughest grouped kernels, keeping the `kept` smoothest."""
    smoothness = np.asarray(smoothness, dtype=np.float64)
    return _ranked(context, "least-smooth", smoothness, np.lexsort([smoothness])[:kept])


def random_select(channels: int, kept: int, rng: np.random.Generator,
                  context: GroupContext | None = None) -> Choice:
    """Baseline: a seeded random choice of `kept` grouped kernels."""
    _check_kept(kept, channels)
    chosen = rng.choice(channels, size=kept, replace=False)  # pragma: no mutate (replace=None also draws without)
    return _ranked(context, "random", np.zeros(0), chosen)


def _ranked(context: GroupContext | None, method: str, values: np.ndarray, chosen: np.ndarray) -> Choice:
    choice = Choice(sorted(int(c) for c in chosen))
    if context is not None:
        context.tracer.emit(RankedSelection(context.layer, context.group, method, tuple(values.tolist()),
                                            tuple(choice.kept)))
        context.tracer.emit(FinalChoice(context.layer, context.group, tuple(choice.kept), None, None))
    return choice
