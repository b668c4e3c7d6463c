"""Stratified, seeded holdout splits and scikit-learn's digits, both without importing
scikit-learn, whose import costs about a second of the TUI's start. The split draws the same
random numbers in the same order as scikit-learn's `train_test_split(..., stratify=labels,
random_state=seed)`, so every split made before (the bundled sample was trained on one) stays
the same; tests hold both to scikit-learn's own results."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

DIGITS_FILE = ("datasets", "data", "digits.csv.gz")  # inside the scikit-learn package


class SplitError(ValueError):
    """The labels cannot be split so that every class is in both parts."""


def apportion(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """`draws` items shared over classes in proportion to `counts`: each class gets the floor of
    its share, then the classes with the largest remainders one more each, ties drawn by `rng`."""
    share = counts / counts.sum() * draws
    given = np.floor(share)
    missing = int(draws - given.sum())
    remainder = share - given
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing <= 0:
            break
        tied = np.flatnonzero(remainder == value)
        take = min(len(tied), missing)
        given[rng.choice(tied, size=take, replace=False)] += 1
        missing -= take
    return given.astype(int)


def stratified_holdout(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of `labels` split into (rest, held) with `holdout` held items, each class in
    both parts in proportion to its size, each part in a random order; `seed` fixes the draws."""
    n = len(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    counts = np.bincount(inverse)
    kept = n - holdout
    if not 0 < holdout < n or counts.min() < 2 or min(kept, holdout) < len(classes):
        raise SplitError(f"cannot hold out {holdout} of {n} items in {len(classes)} classes (smallest {counts.min()})")
    members = np.split(np.argsort(inverse, kind="mergesort"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    kept_counts = apportion(counts, kept, rng)
    held_counts = apportion(counts - kept_counts, holdout, rng)
    rest: list[int] = []
    held: list[int] = []
    for k, positions in enumerate(members):
        shuffled = positions[rng.permutation(counts[k])]
        rest.extend(shuffled[: kept_counts[k]])
        held.extend(shuffled[kept_counts[k] : kept_counts[k] + held_counts[k]])
    return rng.permutation(rest), rng.permutation(held)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8×8 digits as (images 0..16 float64 (n, 8, 8), labels int (n,)), read
    from the file scikit-learn ships, without importing it. Raises `FileNotFoundError` naming
    the path when scikit-learn or its digits file is missing."""
    spec = importlib.util.find_spec("sklearn")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    if not roots:
        raise FileNotFoundError("scikit-learn is not installed, and its digits file comes with it")
    path = Path(roots[0], *DIGITS_FILE)
    with gzip.open(path, "rt", encoding="ascii") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)
