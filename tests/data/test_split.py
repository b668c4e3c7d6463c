"""The split and the digits reader that avoid importing scikit-learn give exactly what
scikit-learn gives: the same positions for random label sets, class counts, holdout sizes and
seeds (ties in the class shares included), and the same digits images and labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from engine.data.split import SplitError, apportion, digits_arrays, stratified_holdout


def sklearn_holdout(labels: np.ndarray, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return train_test_split(np.arange(len(labels)), test_size=holdout, stratify=labels, random_state=seed, shuffle=True)


@pytest.mark.parametrize("case", range(60))
def test_split_equals_scikit_learns(case: int) -> None:
    rng = np.random.default_rng(case)
    classes = int(rng.integers(2, 12))
    sizes = rng.integers(2, 40, size=classes)
    if case % 3 == 0:
        sizes[:] = sizes[0]  # equal classes: every share has the same remainder, so ties are drawn
    labels = rng.permutation(np.repeat(rng.choice(1000, size=classes, replace=False), sizes))
    n = len(labels)
    holdout = int(rng.integers(classes, n - classes + 1))
    seed = int(rng.integers(0, 2**31))
    rest, held = stratified_holdout(labels, holdout, seed)
    want_rest, want_held = sklearn_holdout(labels, holdout, seed)
    np.testing.assert_array_equal(rest, want_rest)
    np.testing.assert_array_equal(held, want_held)


def test_the_digits_splits_are_scikit_learns() -> None:
    labels = load_digits().target
    for seed in (0, 1, 7):
        for got, want in zip(stratified_holdout(labels, 359, seed), sklearn_holdout(labels, 359, seed)):
            np.testing.assert_array_equal(got, want)


def test_apportion_gives_remainders_to_the_largest_shares_first() -> None:
    rng = np.random.RandomState(0)
    assert apportion(np.array([5, 4, 1]), 7, rng).tolist() == [3, 3, 1]  # shares 3.5, 2.8, 0.7: two more, to .8 and .7
    assert apportion(np.array([5, 3, 2]), 5, rng).tolist() in ([3, 1, 1], [2, 2, 1])  # 2.5, 1.5, 1.0: a tie, drawn
    got = apportion(np.array([4, 4, 4]), 4, rng)
    assert got.sum() == 4 and sorted(got.tolist()) == [1, 1, 2]


@pytest.mark.parametrize(("labels", "holdout"), [([0, 0, 1], 1), ([0, 0, 1, 1], 1), ([0, 0, 1, 1], 4), ([0, 0, 1, 1], 0)])
def test_impossible_splits_are_refused(labels: list[int], holdout: int) -> None:
    with pytest.raises(SplitError):
        stratified_holdout(np.array(labels), holdout, 0)


def test_digits_read_from_the_file_equal_load_digits() -> None:
    images, labels = digits_arrays()
    digits = load_digits()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(labels, digits.target)
    assert images.shape == (1797, 8, 8) and images.dtype == np.float64


def test_loading_digits_does_not_import_scikit_learn() -> None:
    import subprocess
    import sys

    code = ("import sys; from engine.data.datasets import load_data; b = load_data('digits'); "
            "print(len(b.train), len(b.val), len(b.test), any(m == 'sklearn' or m.startswith('sklearn.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["1258", "180", "359", "False"]
