"""The search engine's own pieces (engine/gkp/search.py) against hand-worked values and naive
pure-Python references: fixed point, beta, bit packing, ranks, set sharing, beam growth and the
gamma-nearest outer sum."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest

from engine.gkp.search import (
    Beam,
    Problems,
    _distinct,
    _groups_of_equal,
    _Keys,
    _with_bit,
    backtrack,
    gamma_outer,
    grow,
    min_rank,
    pair_beta,
    to_fixed_point,
)


def random_problems(seed: int, groups: int, channels: int, ties: bool) -> Problems:
    """Symmetric zero-diagonal distances, small integers (many ties) or floats (inexact sums)."""
    rng = np.random.default_rng(seed)
    distances, smoothness = [], []
    for _ in range(groups):
        upper = rng.integers(0, 4, (channels, channels)) if ties else rng.random((channels, channels))
        upper = np.triu(upper, 1).astype(float)
        distances.append(upper + upper.T)
        smoothness.append(rng.integers(0, 3, channels).astype(float) if ties else rng.random(channels))
    return Problems.build(distances, smoothness)


def naive_grow(d: list[list[int]], s: list[int], beam: Beam, start: int):
    """One lane's search as SPEC §4 words it, on Python ints: returns the final candidates' members
    and every cut's (size, candidates, survivor positions)."""
    channels = len(d)

    def inner(v):
        return sum(d[a][b] for a, b in combinations(v, 2))

    def outer(v):
        return sum(min(d[p][m] for m in v) for p in range(channels) if p not in v)

    entries, cuts = [[start]], []
    while len(entries[0]) < beam.kept:
        width = min(beam.width, channels - len(entries[0]))
        candidates = []
        for entry in entries:
            sums = sorted(((sum(d[x][m] for m in entry), x) for x in range(channels) if x not in entry),
                          key=lambda t: (-t[0], t[1]))
            candidates += [entry + [x] for _, x in sums[:width]]
        size = len(candidates[0])
        if beam.is_cut(size):
            beta = beam.beta(size, channels)
            cost = [inner(v) - beta * outer(v) for v in candidates]
            smooth = [sum(s[i] for i in v) for v in candidates]
            score = [beam.alpha * sum(c2 > c for c2 in cost) + (1.0 - beam.alpha) * sum(s2 < t for s2 in smooth)
                     for c, t in zip(cost, smooth)]
            order = sorted(range(len(candidates)), key=lambda i: (score[i], -smooth[i], i))[:beam.width]
            cuts.append((size, candidates, order))
            candidates = [candidates[i] for i in order]
        entries = candidates
    return [(v, inner(v), outer(v), sum(s[i] for i in v)) for v in entries], cuts


def lanes_of(problems: Problems) -> tuple[np.ndarray, np.ndarray]:
    """Every (group, start) pair as lanes, group-major."""
    owner, starts = np.divmod(np.arange(len(problems) * problems.channels), problems.channels)
    return owner, starts


# --- fixed point and beta -------------------------------------------------------------------

@pytest.mark.parametrize("terms, unit", [(1, 2.0**-59), (2, 2.0**-58), (3, 2.0**-58), (4, 2.0**-57),
                                         (7, 2.0**-57), (8, 2.0**-56)])
def test_fixed_point_unit_leaves_room_for_terms(terms, unit):
    """The unit is 2**(e - 62 + ceil(log2(terms + 1))) for a largest value in [2**(e-1), 2**e): here
    3.0 (e = 2), so `terms` copies of the largest integer stay below 2**62."""
    q, got = to_fixed_point(np.array([3.0, -1.5]), terms)
    assert got == unit
    assert q.tolist() == [round(3.0 / unit), round(-1.5 / unit)]
    assert q.dtype == np.int64 and terms * abs(int(q[0])) < 2**62


def test_fixed_point_rounds_to_nearest_even_and_keeps_sums_exact():
    """Values below the unit round half to even; the integers' sums are exact where floats drift."""
    unit = 2.0**-60  # largest 1.0 (e = 1), one term
    q, got = to_fixed_point(np.array([1.0, 2.5 * unit, 3.5 * unit, -2.5 * unit]), 1)
    assert got == unit and q.tolist() == [2**60, 2, 4, -2]
    values = np.random.default_rng(3).random(50)
    q, unit = to_fixed_point(values, 50)
    assert sum(int(v) for v in q) == int(q.sum())  # int64 sum: no wrap, no rounding
    assert abs(int(q.sum()) * unit - math.fsum(values)) <= 50 * unit


def test_fixed_point_works_in_float64_whatever_the_input_dtype():
    """Half-precision input is scaled in float64 (in float16 the scaled values would overflow)."""
    q, unit = to_fixed_point(np.array([3.0, 1.5], dtype=np.float16), 1)
    assert unit == 2.0**-59 and q.tolist() == [3 * 2**59, 3 * 2**58]


@pytest.mark.parametrize("values", [np.zeros((2, 3)), np.empty(0), np.empty((0, 4))])
def test_fixed_point_of_nothing_or_zeros_is_zero_with_unit_one(values):
    """All-zero or empty input gives int64 zeros of the same shape and unit 1."""
    q, unit = to_fixed_point(values, 9)
    assert unit == 1.0 and q.dtype == np.int64 and q.shape == values.shape and not q.any()


@pytest.mark.parametrize("size, channels, beta", [(3, 4, 3.0), (2, 5, 1 / 3), (6, 10, 15 / 4), (4, 4, 0.0),
                                                  (1, 1, 0.0)])
def test_pair_beta_is_pairs_over_pruned(size, channels, beta):
    """SPEC's automatic beta C(m,2) / (C_in - m), 0 when nothing is pruned (one pruned kernel divides by 1)."""
    assert pair_beta(size, channels) == beta


def test_problems_without_smoothness_have_zero_int_smoothness_and_unit_one():
    """Greedy problems carry int64 zero smoothness with unit 1, and each group its own distance unit."""
    problems = Problems.build([np.ones((3, 3)) - np.eye(3), 4 * (np.ones((3, 3)) - np.eye(3))])
    assert problems.sq.dtype == np.int64 and problems.sq.shape == (2, 3) and not problems.sq.any()
    assert problems.s_unit.tolist() == [1.0, 1.0]
    assert problems.unit[1] == 4 * problems.unit[0] and (problems.dq[0] == problems.dq[1]).all()


# --- lineage and ranks ----------------------------------------------------------------------

def test_backtrack_follows_parents_to_the_start():
    """Two lanes, two recorded steps: members come back in insertion order as int64."""
    starts = np.array([7, 8])
    parents = [np.array([[0, 0], [0, 0]]), np.array([[1, 0, 1], [0, 0, 1]])]
    addeds = [np.array([[1, 2], [3, 4]]), np.array([[5, 6, 9], [10, 11, 12]])]
    out = backtrack(starts, parents, addeds, np.array([[0, 2], [1, 2]]))
    assert out.dtype == np.int64
    assert out.tolist() == [[[7, 2, 5], [7, 2, 9]], [[8, 3, 11], [8, 4, 12]]]


def test_min_rank_counts_strictly_smaller_and_ties_share_the_lower_rank():
    """Rank = number of strictly smaller entries in the row, as int64, against a naive count."""
    assert min_rank(np.array([[3, 1, 3, 0], [2, 2, 2, 2]])).tolist() == [[2, 1, 2, 0], [0, 0, 0, 0]]
    values = np.random.default_rng(5).integers(0, 4, (6, 9)).astype(float)
    ranks = min_rank(values)
    assert ranks.dtype == np.int64
    assert ranks.tolist() == [[sum(b < a for b in row) for a in row] for row in values.tolist()]


# --- set keys and bits ----------------------------------------------------------------------

def test_keys_are_reproducible_distinct_and_use_all_64_bits():
    """The same shape gets the same keys every time; 300 keys are distinct and spread over the
    whole 64-bit range (high bit both set and clear)."""
    keys, again = _Keys(4, 296), _Keys(4, 296)
    assert (keys.group == again.group).all() and (keys.kernel == again.kernel).all()
    every = np.concatenate([keys.group, keys.kernel])
    assert every.dtype == np.uint64 and len(np.unique(every)) == 300
    high = every >> np.uint64(63)
    assert high.any() and not high.all()


@pytest.mark.parametrize("channels, words", [(1, 1), (63, 1), (64, 1), (65, 2), (128, 2), (129, 3)])
def test_sets_take_one_64_bit_word_per_64_channels(channels, words):
    """Membership bits need ceil(C / 64) words."""
    assert _Keys(1, channels).words == words


def test_with_bit_sets_word_k_div_64_bit_k_mod_64():
    """Kernels either side of the 64 and 128 boundaries land in the right word and bit, on top of
    the bits already there, without touching the input."""
    kernels = np.array([0, 63, 64, 127, 128, 191, 70])
    bits = np.zeros((len(kernels), 3), dtype=np.uint64)
    bits[6, 0] = 5
    out = _with_bit(bits, kernels)
    expected = [[0, 0, 0] for _ in kernels]
    for row, k in enumerate(kernels.tolist()):
        expected[row][k // 64] |= 1 << (k % 64)
    expected[6][0] |= 5
    assert out.tolist() == expected and bits[0, 0] == 0


def members_of(bits: np.ndarray, channels: int) -> list[list[int]]:
    """The members of each set, read bit by bit from its membership words (the naive decoder)."""
    return [[k for k in range(channels) if (int(row[k // 64]) >> (k % 64)) & 1] for row in bits]


@pytest.mark.parametrize("channels", [5, 63, 64, 65, 128, 130])
def test_with_bit_packs_sets_that_decode_to_their_members(channels):
    """Sets packed kernel by kernel decode, bit by bit, to their ascending members."""
    rng = np.random.default_rng(channels)
    sets = [sorted(rng.choice(channels, 4, replace=False).tolist()) for _ in range(6)]
    bits = np.zeros((6, _Keys(1, channels).words), dtype=np.uint64)
    for column in rng.permuted(np.array(sets), axis=1).T:
        bits = _with_bit(bits, column)
    assert members_of(bits, channels) == sets


# --- telling sets apart ---------------------------------------------------------------------

@pytest.mark.parametrize("keys", [[5, 5], [5, 5, 7], [9], [1, 2, 2], [2, 1, 2, 1, 2], [7, 7, 7]])
def test_groups_of_equal_keys(keys):
    """One representative per distinct key and each key's group, checked against a set count."""
    key = np.array(keys, dtype=np.uint64)
    first, inverse = _groups_of_equal(key)
    assert len(first) == len(set(keys)) and len(set(key[first].tolist())) == len(first)
    assert (key[first][inverse] == key).all()


def test_groups_of_equal_on_many_duplicates():
    """Random keys with many repeats group exactly as np.unique does."""
    key = np.random.default_rng(1).integers(0, 20, 200).astype(np.uint64)
    first, inverse = _groups_of_equal(key)
    assert sorted(key[first].tolist()) == np.unique(key).tolist()
    assert (key[first][inverse] == key).all()


def test_distinct_on_colliding_keys_compares_exact_bits_and_groups():
    """With every key equal, sets differing only in the lowest bit (high bit set) or only in their
    group stay apart, and equal (group, set) rows merge."""
    top = np.uint64(1 << 63)
    bits = np.array([[top | np.uint64(1)], [top], [top], [top | np.uint64(1)], [top]], dtype=np.uint64)
    owner = np.array([0, 0, 1, 0, 0])
    first, inverse = _distinct(owner, bits, np.zeros(5, dtype=np.uint64))
    assert len(first) == 3
    assert inverse[0] == inverse[3] and inverse[1] == inverse[4] and len({inverse[0], inverse[1], inverse[2]}) == 3
    assert (bits[first][inverse] == bits).all() and (owner[first][inverse] == owner).all()


# --- growth against the naive search --------------------------------------------------------

BEAMS = [Beam(4), Beam(5, 2, 1), Beam(5, 2, 2), Beam(6, 3, 2, alpha=0.5), Beam(5, 2, 2, cut_at_final=True),
         Beam(6, 2, 3, frozen_beta=0.75), Beam(1), Beam(7, 3, 1)]


@pytest.mark.parametrize("ties", [True, False])
@pytest.mark.parametrize("beam", BEAMS, ids=range(len(BEAMS)))
def test_grow_matches_naive_search(beam, ties):
    """Every lane's final candidates (members, exact inner/outer/smoothness sums) and every cut's
    candidates and survivors equal the naive one-lane search, ties included."""
    problems = random_problems(11 + beam.kept, 2, 7, ties)
    owner, starts = lanes_of(problems)
    grown = grow(problems, beam, owner, starts, record=True)
    assert grown.inner.dtype == np.int64 and grown.outer.dtype == np.int64
    leaves = np.broadcast_to(np.arange(grown.inner.shape[1]), grown.inner.shape)
    members = grown.members(leaves)
    naive = [naive_grow(problems.dq[g].tolist(), problems.sq[g].tolist(), beam, s) for g, s in zip(owner, starts)]
    for lane, (final, cuts) in enumerate(naive):
        assert members[lane].tolist() == [v for v, *_ in final]
        assert grown.inner[lane].tolist() == [i for _, i, _, _ in final]
        assert grown.outer[lane].tolist() == [o for _, _, o, _ in final]
        assert grown.smooth[lane].tolist() == [t for *_, t in final]
        assert [c.size for c in grown.cuts] == [size for size, _, _ in cuts]
        for cut, (_, candidates, kept) in zip(grown.cuts, cuts):
            assert cut.members[lane].tolist() == candidates
            assert cut.keep[lane].tolist() == kept  # best first


def test_grow_records_cuts_only_when_asked():
    """Without `record` no cut details are kept (they cost a backtrack per cut)."""
    problems = random_problems(2, 1, 6, True)
    owner, starts = lanes_of(problems)
    assert grow(problems, Beam(5, 2, 2), owner, starts).cuts == []
    assert [cut.size for cut in grow(problems, Beam(5, 2, 2), owner, starts, record=True).cuts] == [3]


@pytest.mark.parametrize("beam", [Beam(4), Beam(5, 2, 2), Beam(5, 3, 3)], ids=range(3))
def test_lanes_reaching_the_same_set_share_one_state(beam):
    """Final candidates share a state exactly when they hold the same set of the same group: one
    state per distinct (group, set), whose bits are that set."""
    problems = random_problems(4, 2, 6, True)
    owner, starts = lanes_of(problems)
    grown = grow(problems, beam, owner, starts)
    leaves = np.broadcast_to(np.arange(grown.inner.shape[1]), grown.inner.shape)
    sets = [(int(g), tuple(sorted(v))) for g, row in zip(owner, grown.members(leaves).tolist()) for v in row]
    state = grown.final_state.ravel().tolist()
    assert len(set(sets)) < len(sets)  # the case does exercise sharing
    assert len(set(state)) == len(set(sets)) == len(set(zip(state, sets)))
    assert len(grown.final_bits) == len(set(sets))
    assert all(tuple(members_of(grown.final_bits[s:s + 1], 6)[0]) == v for s, (_, v) in zip(state, sets))


# --- gamma-nearest outer sum ----------------------------------------------------------------

@pytest.mark.parametrize("budget", [1, 100, 1 << 22])
@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_gamma_outer_matches_naive(gamma, budget):
    """Sum over pruned kernels of their `gamma` nearest members' distances, exact in int64, the same
    in one chunk or many."""
    problems = random_problems(8, 3, 8, False)
    rng = np.random.default_rng(gamma)
    owner = rng.integers(0, 3, 10)
    sets = np.array([rng.choice(8, 4, replace=False) for _ in range(10)])
    out = gamma_outer(problems, owner, sets, gamma, budget)
    assert out.dtype == np.int64
    expected = [sum(sum(sorted(int(problems.dq[g, p, m]) for m in v)[:gamma]) for p in range(8) if p not in v)
                for g, v in zip(owner.tolist(), sets.tolist())]
    assert out.tolist() == expected


@pytest.mark.parametrize("gamma", [1, 2])
def test_gamma_outer_on_sets_of_a_thousand_kernels(gamma):
    """Wide layers: with 1100 of 1200 kernels kept, each pruned kernel's `gamma` nearest members
    are still the smallest distances (numpy partitions such rows differently from short ones)."""
    rng = np.random.default_rng(gamma)
    upper = np.triu(rng.integers(1, 1 << 40, (1200, 1200)), 1)
    problems = Problems(np.array([upper + upper.T]), np.zeros((1, 1200), dtype=np.int64), np.ones(1), np.ones(1))
    sets = np.sort([rng.choice(1200, 1100, replace=False) for _ in range(2)], axis=1)
    out = gamma_outer(problems, np.zeros(2, dtype=np.int64), sets, gamma)
    for row, members in enumerate(sets):
        pruned = np.setdiff1d(np.arange(1200), members)
        nearest = np.sort(problems.dq[0][np.ix_(pruned, members)], axis=1)[:, :gamma]
        assert int(out[row]) == sum(int(v) for v in nearest.ravel())
