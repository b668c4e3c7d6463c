"""Stage 2 (SPEC §4): which grouped kernels each filter group keeps. TMI-GKP greedy with
restarts (Eq. 5), SR-GKP smooth beam greedy (Eq. 2, Eq. 3), and the ablation baselines.

The searches run every restart (and every beam entry) at once on numpy arrays. Distances and
smoothness are held in fixed point (int64, scaled by a power of two) so every running sum is
exact: the same set always scores the same, whatever order it was built in."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.spatial.distance import pdist, squareform

from ..common.progress import check_cancel
from .traces import (
    BeamCandidate,
    BeamCut,
    BeamFinal,
    FinalCandidate,
    FinalChoice,
    RankedSelection,
    StartResults,
    Tracer,
)

_NEG = -(1 << 62)  # marks kernels already in a set; stays negative after any sum of distances
_BIG = 1 << 62  # subtracted to hide a proposal from the next argmax, then added back
_CHUNK_ELEMENTS = 1 << 18  # restarts per chunk keep each (restarts x candidates x C_in) array cache-sized


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


def grouped_kernels(weight: torch.Tensor | np.ndarray, filters: list[int]) -> np.ndarray:
    """The grouped kernels of one filter group, one row per input channel: `(C_in, |g|*k*k)`."""
    array = weight if isinstance(weight, np.ndarray) else weight.detach().to(torch.float64).cpu().numpy()
    slab = array[filters]
    return slab.swapaxes(0, 1).reshape(slab.shape[1], -1)


def kernel_distances(kernels: np.ndarray) -> np.ndarray:
    """Euclidean distance between every pair of grouped kernels, `(C_in, C_in)`."""
    return squareform(pdist(kernels))


def pair_beta(size: int, in_channels: int) -> float:
    """SR-GKP's automatic balance `C(m,2) / (C_in - m)` (0 when nothing is pruned)."""
    pruned = in_channels - size
    return math.comb(size, 2) / pruned if pruned > 0 else 0.0


def gamma_count(kept: int, gamma_ratio: float) -> int:
    """How many nearest kept kernels Eq. 5 sums per pruned kernel, `max(1, floor(ratio*S))`."""
    return max(1, math.floor(gamma_ratio * kept + 1e-9))  # 0.29 * 100 is 28.999... in floating point


def to_fixed_point(values: np.ndarray, terms: int) -> tuple[np.ndarray, float]:
    """Integers `values / unit` (rounded) with `unit` a power of two chosen so that any sum of
    up to `terms` of them stays below 2**62 in magnitude."""
    values = np.asarray(values, dtype=np.float64)
    largest = float(np.abs(values).max()) if values.size else 0.0
    if largest == 0.0:
        return np.zeros(values.shape, dtype=np.int64), 1.0
    bits = 62 - math.ceil(math.log2(terms + 1))
    unit = math.ldexp(1.0, math.frexp(largest)[1] - bits)
    return np.rint(values / unit).astype(np.int64), unit


@dataclass
class _Search:
    """One group's search problem in fixed point, and how the beam grows."""

    dq: np.ndarray
    sq: np.ndarray
    kept: int
    width: int
    check_every: int | None = None
    alpha: float = 0.9
    frozen_beta: float | None = None

    @property
    def channels(self) -> int:
        return len(self.dq)

    def beta(self, size: int) -> float:
        return self.frozen_beta if self.frozen_beta is not None else pair_beta(size, self.channels)

    def is_cut(self, size: int) -> bool:
        return bool(self.check_every) and size < self.kept and (size - 1) % self.check_every == 0  # type: ignore[operator]


@dataclass
class _Cut:
    """Everything one cut decided, per restart of the chunk (arrays `(P, N)`)."""

    size: int
    beta: float
    members: np.ndarray
    added: np.ndarray
    cost_q: np.ndarray
    smooth_q: np.ndarray
    rank_cost: np.ndarray
    rank_smooth: np.ndarray
    score: np.ndarray
    survived: np.ndarray


@dataclass
class _Grown:
    """Complete candidates of a chunk of restarts: members `(P, L, S)` in insertion order and
    their exact inner sum, nearest-kept outer sum and smoothness `(P, L)`."""

    members: np.ndarray
    inner: np.ndarray
    outer: np.ndarray
    smooth: np.ndarray
    cuts: list[_Cut] = field(default_factory=list)


def _backtrack(starts: np.ndarray, parents: list[np.ndarray], addeds: list[np.ndarray],
               leaves: np.ndarray) -> np.ndarray:
    """Members (insertion order) of the entries `leaves` (P, L) of the last recorded step."""
    out = np.empty((*leaves.shape, len(parents) + 1), dtype=np.int64)
    at = np.arange(len(starts))[:, None]
    current = leaves
    for step in reversed(range(len(parents))):
        out[..., step + 1] = addeds[step][at, current]
        current = parents[step][at, current]
    out[..., 0] = starts[:, None]
    return out


def _grow(search: _Search, starts: np.ndarray, record: bool = False) -> _Grown:
    """Grow every restart in `starts` to `kept` kernels at once. Each step every entry proposes
    its `width` kernels of largest summed distance to the entry (ties: lowest index); at cut
    sizes the candidates are ranked by Eq. 3 cost and smoothness and `width` survive."""
    dq, sq, channels, kept = search.dq, search.sq, search.channels, search.kept
    count = len(starts)
    at = np.arange(count)[:, None]
    rows = dq[starts]
    runsum = rows[:, None, :].copy()
    runsum[at[:, 0], 0, starts] = _NEG
    mind = rows[:, None, :].copy()
    inner = np.zeros((count, 1), dtype=np.int64)
    smooth = sq[starts][:, None].copy()
    outer = mind.sum(axis=2)
    parents: list[np.ndarray] = []
    addeds: list[np.ndarray] = []
    cuts: list[_Cut] = []
    size = 1
    while size < kept:
        entries = runsum.shape[1]
        width = min(search.width, channels - size)
        slot = at[:, :, None], np.arange(entries)[None, :, None]
        proposal = np.empty((count, entries, width), dtype=np.int64)
        for j in range(width):
            proposal[..., j] = runsum.argmax(axis=2)
            runsum[(*slot, proposal[..., j : j + 1])] -= _BIG
        gain = runsum[(*slot, proposal)] + _BIG
        runsum[(*slot, proposal)] = gain
        size += 1
        n_cand = entries * width
        added = proposal.reshape(count, n_cand)
        inner_c = (inner[..., None] + gain).reshape(count, n_cand)
        smooth_c = (smooth[..., None] + sq[proposal]).reshape(count, n_cand)
        rows = dq[proposal]  # (P, E, w, C)
        final, cut = size == kept, search.is_cut(size)
        if final or cut:
            nearest = np.minimum(mind[:, :, None, :], rows)
            outer_c = nearest.sum(axis=3).reshape(count, n_cand)
        if final:
            parents.append(np.broadcast_to(np.arange(n_cand) // width, (count, n_cand)))
            addeds.append(added)
            inner, outer, smooth = inner_c, outer_c, smooth_c
            break
        if cut:
            beta = search.beta(size)
            cost = inner_c - beta * outer_c
            rank_cost = _min_rank(-cost)
            rank_smooth = _min_rank(smooth_c)
            score = search.alpha * rank_cost + (1.0 - search.alpha) * rank_smooth
            index = np.broadcast_to(np.arange(n_cand), (count, n_cand))
            order = np.lexsort((index, -smooth_c, score), axis=1)  # score, then rougher, then first
            keep = order[:, : min(search.width, n_cand)]
            if record:
                previous = _backtrack(starts, parents, addeds, np.broadcast_to(np.arange(entries), (count, entries)))
                members = np.concatenate([np.repeat(previous, width, axis=1), added[..., None]], axis=2)
                survived = np.zeros((count, n_cand), dtype=bool)
                survived[at, keep] = True
                cuts.append(_Cut(size, beta, members, added, cost, smooth_c, rank_cost, rank_smooth, score, survived))
            from_entry = keep // width
            chosen = rows.reshape(count, n_cand, channels)[at, keep]
            runsum = runsum[at, from_entry] + chosen
            mind = nearest.reshape(count, n_cand, channels)[at, keep]
            added, inner, smooth = added[at, keep], inner_c[at, keep], smooth_c[at, keep]
            parents.append(from_entry)
        else:
            runsum = (runsum[:, :, None, :] + rows).reshape(count, n_cand, channels)
            mind = np.minimum(mind[:, :, None, :], rows).reshape(count, n_cand, channels)
            inner, smooth = inner_c, smooth_c
            parents.append(np.broadcast_to(np.arange(n_cand) // width, (count, n_cand)))
        runsum[at, np.arange(runsum.shape[1])[None, :], added] = _NEG
        addeds.append(added)
    leaves = np.broadcast_to(np.arange(inner.shape[1]), inner.shape)
    return _Grown(_backtrack(starts, parents, addeds, leaves), inner, outer, smooth, cuts)


def _min_rank(values: np.ndarray) -> np.ndarray:
    """Per row, how many entries are strictly smaller: rank 0 = smallest, ties share the lower
    rank."""
    return (values[:, None, :] < values[:, :, None]).sum(axis=2)


def _chunks(total: int, cost_each: int) -> list[np.ndarray]:
    """Split `range(total)` so each part's `count * cost_each` array elements stay cache-sized."""
    size = max(1, _CHUNK_ELEMENTS // max(1, cost_each))
    return [np.arange(lo, min(lo + size, total)) for lo in range(0, total, size)]


def _check_kept(kept: int, channels: int) -> None:
    if not 1 <= kept <= channels:
        raise ValueError(f"cannot keep {kept} of {channels} grouped kernels")


def smooth_beam_select(distances: np.ndarray, smoothness: np.ndarray, kept: int, *, beam_width: int = 2,
                       check_every: int = 3, alpha: float = 0.9, freeze_beta: bool = False,
                       context: GroupContext | None = None,
                       cancel: threading.Event | None = None) -> Choice:
    """SR-GKP Stage 2 for one group: a beam search from every start kernel, then the candidate
    with the highest Eq. 3 cost (`beta = C(S,2)/(C_in-S)`) over all starts, earliest on ties.
    `freeze_beta` (compat `reference`) uses the first cut's beta for every later cut and the
    final pick."""
    channels = len(distances)
    _check_kept(kept, channels)
    dq, unit = to_fixed_point(distances, channels * channels)
    sq, s_unit = to_fixed_point(smoothness, channels)
    first_cut = check_every + 1
    frozen = pair_beta(first_cut, channels) if freeze_beta and first_cut < kept else None
    search = _Search(dq, sq, kept, beam_width, check_every, alpha, frozen)
    beta = search.beta(kept)
    full = context is not None and context.tracer.full
    candidates = beam_width ** check_every * beam_width
    best_members, best_scores = [], []
    for starts in _chunks(channels, candidates * channels):
        check_cancel(cancel)
        grown = _grow(search, starts, record=full)
        costs = (grown.inner - beta * grown.outer) * unit
        pick = costs.argmax(axis=1)
        best_members.extend(grown.members[np.arange(len(starts)), pick].tolist())
        best_scores.extend(costs[np.arange(len(starts)), pick].tolist())
        if full:
            _emit_beam(context, starts, grown, costs, pick, unit, s_unit, beta)  # type: ignore[arg-type]
    winner = int(np.argmax(best_scores))
    if context is not None and not full:
        starts = np.array([winner])
        grown = _grow(search, starts, record=True)
        costs = (grown.inner - beta * grown.outer) * unit
        _emit_beam(context, starts, grown, costs, costs.argmax(axis=1), unit, s_unit, beta)
    return _finish(context, "smooth-beam", beta, 1, best_members, best_scores, winner)


def greedy_select(distances: np.ndarray, kept: int, *, gamma_ratio: float = 0.2, beta: float | str = "auto",
                  context: GroupContext | None = None, cancel: threading.Event | None = None) -> Choice:
    """TMI-GKP Stage 2 for one group (Algorithm 1 + Eq. 5): a greedy set from every start kernel,
    scored `inner - beta * sum over pruned of its gamma nearest kept distances`; the highest
    wins, the lowest start on ties."""
    channels = len(distances)
    _check_kept(kept, channels)
    gamma = gamma_count(kept, gamma_ratio)
    pruned = channels - kept
    if beta == "auto":
        beta = math.comb(kept, 2) / (pruned * gamma) if pruned else 0.0
    dq, unit = to_fixed_point(distances, channels * channels)
    search = _Search(dq, np.zeros(channels, dtype=np.int64), kept, 1)
    members, scores = [], []
    for starts in _chunks(channels, channels):
        check_cancel(cancel)
        grown = _grow(search, starts)
        sets = grown.members[:, 0, :]
        outer = grown.outer[:, 0] if gamma == 1 else _gamma_outer(dq, sets, gamma)
        members.extend(sets.tolist())
        scores.extend(((grown.inner[:, 0] - float(beta) * outer) * unit).tolist())
    return _finish(context, "greedy", float(beta), gamma, members, scores, int(np.argmax(scores)))


def _gamma_outer(dq: np.ndarray, sets: np.ndarray, gamma: int) -> np.ndarray:
    """Per set, the sum over pruned kernels of the distances to their `gamma` nearest members."""
    out = np.empty(len(sets), dtype=np.int64)
    for part in _chunks(len(sets), sets.shape[1] * len(dq)):
        to_members = np.swapaxes(dq[sets[part]], 1, 2)  # (P, C, S): every kernel to each member
        nearest = np.partition(to_members, gamma - 1, axis=2)[..., :gamma].sum(axis=2)
        nearest[np.arange(len(part))[:, None], sets[part]] = 0
        out[part] = nearest.sum(axis=1)
    return out


def _finish(context: GroupContext | None, selection: str, beta: float, gamma: int,
            members: list[list[int]], scores: list[float], winner: int) -> Choice:
    """Emit every start's result and the final choice; return the choice."""
    choice = Choice(sorted(members[winner]), scores[winner], winner)
    if context is not None:
        emit = context.tracer.emit
        emit(StartResults(context.layer, context.group, selection, beta, gamma, tuple(range(len(scores))),
                          tuple(tuple(m) for m in members), tuple(scores)))
        emit(FinalChoice(context.layer, context.group, tuple(choice.kept), choice.score, choice.start))
    return choice


def _emit_beam(context: GroupContext, starts: np.ndarray, grown: _Grown, costs: np.ndarray,
               pick: np.ndarray, unit: float, s_unit: float, beta: float) -> None:
    """Beam cut and final-candidate events for each start of a recorded chunk."""
    emit = context.tracer.emit
    for row, start in enumerate(starts.tolist()):
        for cut in grown.cuts:
            emit(BeamCut(context.layer, context.group, start, cut.size, cut.beta, tuple(
                BeamCandidate(tuple(cut.members[row, i].tolist()), int(cut.added[row, i]),
                              float(cut.cost_q[row, i] * unit), float(cut.smooth_q[row, i] * s_unit),
                              int(cut.rank_cost[row, i]), int(cut.rank_smooth[row, i]),
                              float(cut.score[row, i]), bool(cut.survived[row, i]))
                for i in range(cut.members.shape[1])
            )))
        emit(BeamFinal(context.layer, context.group, start, beta, tuple(
            FinalCandidate(tuple(grown.members[row, i].tolist()), float(costs[row, i]),
                           float(grown.smooth[row, i] * s_unit))
            for i in range(grown.members.shape[1])
        ), int(pick[row])))


def l2_select(kernels: np.ndarray, kept: int, context: GroupContext | None = None) -> Choice:
    """Baseline: keep the `kept` grouped kernels of largest L2 norm (lowest index on ties)."""
    norms = np.linalg.norm(kernels, axis=1)
    return _ranked(context, "l2", norms, np.argsort(-norms, kind="stable")[:kept])


def least_smooth_select(smoothness: np.ndarray, kept: int, context: GroupContext | None = None) -> Choice:
    """Baseline: prune the roughest grouped kernels, keeping the `kept` smoothest."""
    smoothness = np.asarray(smoothness, dtype=np.float64)
    return _ranked(context, "least-smooth", smoothness, np.argsort(smoothness, kind="stable")[:kept])


def random_select(channels: int, kept: int, rng: np.random.Generator,
                  context: GroupContext | None = None) -> Choice:
    """Baseline: a seeded random choice of `kept` grouped kernels."""
    _check_kept(kept, channels)
    return _ranked(context, "random", np.zeros(0), rng.choice(channels, size=kept, replace=False))


def _ranked(context: GroupContext | None, method: str, values: np.ndarray, chosen: np.ndarray) -> Choice:
    choice = Choice(sorted(int(c) for c in chosen))
    if context is not None:
        context.tracer.emit(RankedSelection(context.layer, context.group, method, tuple(values.tolist()),
                                            tuple(choice.kept)))
        context.tracer.emit(FinalChoice(context.layer, context.group, tuple(choice.kept), None, None))
    return choice
