"""The search behind Stage 2 (SPEC §4.1, §4.2): greedy growth and the smooth beam, run for many
restarts of many filter groups of one shape at once on numpy arrays.

A restart is a *lane*; each lane holds beam entries (kernel sets). Everything that decides a
set's future (its proposals, Eq. 3 cost, smoothness) depends on the set alone, so lanes and
entries that reach the same set share one *state*: its running sum of distances and its nearest
kept distance per kernel are computed once per step, however many lanes hold it (within a beam
about two thirds of the candidates at a cut repeat another). Lanes keep their own lineage, so
every lane's candidates, ranks and insertion orders are exactly those of a search run alone.

Distances and smoothness are fixed point (int64, a power-of-two unit per group) so every sum is
exact: the same set scores the same whatever order it was built in."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from ..common.progress import check_cancel

_NEG = -(1 << 62)  # marks kernels already in a set; stays negative after any sum of distances
_BIG = 1 << 62  # subtracted to hide a proposal from the next argmax, then added back
_KEY_SEED = 0x5EED_6B70  # fixes the random set keys; any value gives the same results


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


def pair_beta(size: int, in_channels: int) -> float:
    """SR-GKP's automatic balance `C(m,2) / (C_in - m)` (0 when nothing is pruned)."""
    pruned = in_channels - size
    return math.comb(size, 2) / pruned if pruned > 0 else 0.0


@dataclass(frozen=True)
class Beam:
    """How sets grow: `width` proposals per entry each step (1 and no cuts: greedy); a cut every
    `check_every` steps ranks candidates by `alpha` x cost rank + (1 - alpha) x smoothness rank
    and keeps `width`. `frozen_beta` replaces the size's own beta at every cut (compat
    `reference`), and `cut_at_final` also cuts at the complete size when it falls on the cut
    schedule (the reference code does)."""

    kept: int
    width: int = 1
    check_every: int | None = None
    alpha: float = 0.9
    frozen_beta: float | None = None
    cut_at_final: bool = False

    def beta(self, size: int, channels: int) -> float:
        return self.frozen_beta if self.frozen_beta is not None else pair_beta(size, channels)

    def is_cut(self, size: int) -> bool:
        if not self.check_every or (size - 1) % self.check_every:
            return False
        return size < self.kept or (self.cut_at_final and size == self.kept)


@dataclass
class Problems:
    """Filter groups of one shape in fixed point: distances `dq` (B, C, C), smoothness `sq`
    (B, C), and their units."""

    dq: np.ndarray
    sq: np.ndarray
    unit: np.ndarray
    s_unit: np.ndarray

    @classmethod
    def build(cls, distances: list[np.ndarray], smoothness: list[np.ndarray] | None = None) -> "Problems":
        channels = len(distances[0])
        dq, unit = zip(*(to_fixed_point(d, channels * channels) for d in distances))
        if smoothness is None:
            sq, s_unit = [np.zeros(channels, dtype=np.int64)] * len(distances), [1.0] * len(distances)
        else:
            sq, s_unit = zip(*(to_fixed_point(s, channels) for s in smoothness))
        return cls(np.stack(dq), np.stack(sq), np.array(unit), np.array(s_unit))

    @property
    def channels(self) -> int:
        return self.dq.shape[1]

    def __len__(self) -> int:
        return len(self.dq)


@dataclass
class Cut:
    """Everything one cut decided, per lane (arrays `(L, N)`; members `(L, N, size)`; `keep`
    `(L, width)` the survivors best first; `state` the candidates' states, equal for equal sets).
    Candidates come prefix by prefix: the first `prefix_size` members are one of `prefix_count`
    sets (the previous cut's survivors, or the start), each shared by `N / prefix_count` of them."""

    size: int
    beta: float
    members: np.ndarray
    cost_q: np.ndarray
    smooth_q: np.ndarray
    rank_cost: np.ndarray
    rank_smooth: np.ndarray
    score: np.ndarray
    keep: np.ndarray
    state: np.ndarray
    prefix_size: int
    prefix_count: int


@dataclass
class Grown:
    """Each lane's complete candidates: exact inner sum, nearest-kept outer sum and smoothness
    `(L, N)`, the lineage to recover their members, the states' sets, and recorded cuts."""

    starts: np.ndarray
    inner: np.ndarray
    outer: np.ndarray
    smooth: np.ndarray
    parents: list[np.ndarray]
    addeds: list[np.ndarray]
    final_state: np.ndarray
    final_bits: np.ndarray
    cuts: list[Cut] = field(default_factory=list)

    def members(self, leaves: np.ndarray) -> np.ndarray:
        """Members in insertion order of the final candidates `leaves` (L, K): `(L, K, S)`."""
        return backtrack(self.starts, self.parents, self.addeds, leaves)


def backtrack(starts: np.ndarray, parents: list[np.ndarray], addeds: list[np.ndarray],
              leaves: np.ndarray) -> np.ndarray:
    """Members (insertion order) of the entries `leaves` (L, K) of the last recorded step."""
    out = np.empty((*leaves.shape, len(parents) + 1), dtype=np.int64)
    at = np.arange(len(starts))[:, None]
    current = leaves
    for step in reversed(range(len(parents))):
        out[..., step + 1] = addeds[step][at, current]
        current = parents[step][at, current]
    out[..., 0] = starts[:, None]
    return out


def min_rank(values: np.ndarray) -> np.ndarray:
    """Per row, how many entries are strictly smaller: rank 0 = smallest, ties share the lower
    rank."""
    ranks = np.zeros(values.shape, dtype=np.int64)
    for column in range(values.shape[1]):
        ranks += values[:, column:column + 1] < values
    return ranks


@dataclass
class _States:
    """The distinct sets the lanes hold after a step: owning group, membership bits, random key,
    exact inner and smoothness sums, and (when they grow on) running sums and nearest-kept
    distances per kernel."""

    owner: np.ndarray
    bits: np.ndarray
    key: np.ndarray
    inner: np.ndarray
    smooth: np.ndarray
    runsum: np.ndarray | None = None
    mind: np.ndarray | None = None


class _Keys:
    """Random 64-bit keys per group and per kernel; a set's key is the XOR of its group's and its
    members' keys, so equal sets get equal keys whatever their order (checked on the bits)."""

    def __init__(self, groups: int, channels: int) -> None:
        stream = np.random.PCG64(_KEY_SEED)  # raw 64-bit words: every key equally likely
        self.group = stream.random_raw(groups)
        self.kernel = stream.random_raw(channels)
        self.words = (channels + 63) // 64


def _with_bit(bits: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    out = bits.copy()
    out[np.arange(len(kernels)), kernels >> 6] |= np.left_shift(np.uint64(1), (kernels & 63).astype(np.uint64))
    return out


def _distinct(owner: np.ndarray, bits: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of one row of each distinct (group, set) and every row's distinct index."""
    first, inverse = _groups_of_equal(key)
    if np.array_equal(bits[first][inverse], bits) and np.array_equal(owner[first][inverse], owner):  # pragma: no mutate (else exact path: same sets)
        return first, inverse
    rows = np.ascontiguousarray(np.column_stack([owner.astype(np.uint64), bits]))  # a key collision: exact
    _, first, inverse = np.unique(rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))),
                                  return_index=True, return_inverse=True)
    return first, inverse.ravel()


def _groups_of_equal(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One index per distinct key and each key's distinct index (`np.unique`'s, without its
    stable sort)."""
    order = key.argsort()
    ordered = key[order]
    starts = np.empty(len(key), dtype=bool)
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    starts[:1] = True
    inverse = np.empty(len(key), dtype=np.intp)
    inverse[order] = np.cumsum(starts) - 1
    return order[starts], inverse


def _propose(states: _States, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each state's `width` kernels of largest summed distance to it (ties: lowest index), and
    those sums."""
    runsum = states.runsum
    assert runsum is not None
    at = np.arange(len(runsum))
    proposal = np.empty((len(runsum), width), dtype=np.int64)
    for j in range(width):
        proposal[:, j] = runsum.argmax(axis=1)
        runsum[at, proposal[:, j]] -= _BIG
    gain = runsum[at[:, None], proposal] + _BIG
    runsum[at[:, None], proposal] = gain
    return proposal, gain


def grow(problems: Problems, beam: Beam, owner: np.ndarray, starts: np.ndarray, *, record: bool = False,
         cancel: threading.Event | None = None) -> Grown:
    """Grow lane `l` (group `owner[l]`, start kernel `starts[l]`) to `beam.kept` kernels. Each
    step every entry proposes its `width` kernels of largest summed distance (ties: lowest
    index); at cut sizes each lane ranks its candidates by Eq. 3 cost and smoothness, and
    `width` survive (ties: the rougher, then the first). `record` keeps every cut's details."""
    dq, sq, channels, kept = problems.dq, problems.sq, problems.channels, beam.kept
    rows_of = dq.reshape(len(dq) * channels, channels)  # row `owner * C + kernel`: one gather along the first axis
    lanes = len(starts)
    at = np.arange(lanes)[:, None]
    keys = _Keys(len(problems), channels)
    rows = dq[owner, starts]
    bits = _with_bit(np.zeros((lanes, keys.words), dtype=np.uint64), starts)
    states = _States(owner.copy(), bits, keys.group[owner] ^ keys.kernel[starts],
                     np.zeros(lanes, dtype=np.int64), sq[owner, starts], rows.copy(), rows)
    states.runsum[np.arange(lanes), starts] = _NEG  # type: ignore[index]
    entry = np.arange(lanes)[:, None]
    parents: list[np.ndarray] = []
    addeds: list[np.ndarray] = []
    cuts: list[Cut] = []
    size = prefix_size = prefix_count = 1
    outer = states.mind.sum(axis=1)  # type: ignore[union-attr]
    while size < kept:
        check_cancel(cancel)
        entries = entry.shape[1]
        width = min(beam.width, channels - size)
        proposal, gain = _propose(states, width)
        parent = np.repeat(np.arange(len(proposal)), width)
        added_all = proposal.ravel()
        child_owner = states.owner[parent]
        child_bits = _with_bit(states.bits[parent], added_all)
        first, inverse = _distinct(child_owner, child_bits, states.key[parent] ^ keys.kernel[added_all])
        rep, kernel = parent[first], added_all[first]
        size += 1
        n_cand = entries * width
        candidate = inverse.reshape(len(proposal), width)[entry].reshape(lanes, n_cand)
        added = proposal[entry].reshape(lanes, n_cand)
        grown_owner = child_owner[first]
        child = _States(grown_owner, child_bits[first], states.key[rep] ^ keys.kernel[kernel],
                        states.inner[rep] + gain.ravel()[first], states.smooth[rep] + sq[grown_owner, kernel])
        rows = rows_of.take(grown_owner * channels + kernel, axis=0)
        final, cut = size == kept, beam.is_cut(size)
        nearest = states.mind.take(rep, axis=0)  # type: ignore[union-attr]
        np.minimum(nearest, rows, out=nearest)
        if final or cut:
            outer = nearest.sum(axis=1)
        if not cut:
            parents.append(np.broadcast_to(np.arange(n_cand) // width, (lanes, n_cand)))
            addeds.append(added)
            if final:
                entry = candidate
                break
            child.runsum = states.runsum.take(rep, axis=0)  # type: ignore[union-attr]
            child.runsum += rows
            child.runsum[np.arange(len(kernel)), kernel] = _NEG
            child.mind = nearest
            states, entry = child, candidate
            continue
        beta = beam.beta(size, channels)
        inner_c, outer_c, smooth_c = child.inner[candidate], outer[candidate], child.smooth[candidate]
        cost = inner_c - beta * outer_c
        rank_cost = min_rank(-cost)
        rank_smooth = min_rank(smooth_c)
        score = beam.alpha * rank_cost + (1.0 - beam.alpha) * rank_smooth
        index = np.broadcast_to(np.arange(n_cand), (lanes, n_cand))
        order = np.lexsort((index, -smooth_c, score))  # score, then rougher, then first
        keep = order[:, : min(beam.width, n_cand)]
        if record:
            previous = backtrack(starts, parents, addeds, np.broadcast_to(np.arange(entries), (lanes, entries)))
            members = np.concatenate([np.repeat(previous, width, axis=1), added[..., None]], axis=2)
            cuts.append(Cut(size, beta, members, cost, smooth_c, rank_cost, rank_smooth, score, keep, candidate,
                            prefix_size, prefix_count))
            prefix_size, prefix_count = size, keep.shape[1]
        parents.append(keep // width)
        addeds.append(added[at, keep])
        survivors = candidate[at, keep]
        if final:
            entry = survivors
            break
        first, inverse = _groups_of_equal(survivors.ravel())
        pick, entry = survivors.ravel()[first], inverse.reshape(survivors.shape)
        runsum = states.runsum.take(rep[pick], axis=0)  # type: ignore[union-attr]
        runsum += rows.take(pick, axis=0)
        runsum[np.arange(len(pick)), kernel[pick]] = _NEG
        states = _States(child.owner[pick], child.bits[pick], child.key[pick], child.inner[pick], child.smooth[pick],
                         runsum, nearest.take(pick, axis=0))
    else:
        child = states  # kept == 1: every lane's only candidate is its start
    return Grown(starts, child.inner[entry], outer[entry], child.smooth[entry], parents, addeds, entry,
                 child.bits, cuts)


def gamma_outer(problems: Problems, owner: np.ndarray, sets: np.ndarray, gamma: int,
                budget: int = 1 << 22) -> np.ndarray:
    """Per set (of group `owner[i]`), the sum over pruned kernels of the distances to their `gamma`
    nearest members."""
    channels = problems.channels
    out = np.empty(len(sets), dtype=np.int64)
    step = max(1, budget // max(1, sets.shape[1] * channels))  # pragma: no mutate (chunk size bounds memory only)
    for part in (slice(lo, lo + step) for lo in range(0, len(sets), step)):  # pragma: no mutate (chunking, as above)
        to_members = np.swapaxes(problems.dq[owner[part, None], sets[part]], 1, 2)  # (P, C, S)
        nearest = np.partition(to_members, gamma - 1)[..., :gamma].sum(axis=2)
        nearest[np.arange(len(nearest))[:, None], sets[part]] = 0
        out[part] = nearest.sum(axis=1)
    return out
