"""engine.evaluate.splits: 50/25/25 stratified splits and training fractions from train only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.evaluate.datasets import DatasetError, Samples
from engine.evaluate.sources import FileImages
from engine.evaluate.splits import PAPER_FRACTIONS, make_split, train_fraction


def _samples(counts: list[int], split: list[str] | None = None, task="classification") -> Samples:
    targets = np.repeat(np.arange(len(counts)), counts)
    n = len(targets)
    return Samples(
        task=task,
        root=Path("/fake"),
        images=FileImages([Path(f"/fake/{i}.png") for i in range(n)]),
        targets=targets if task == "classification" else np.linspace(0, 1, n, dtype=np.float32),
        classes=[f"c{i}" for i in range(len(counts))] if task == "classification" else [],
        split=None if split is None else np.asarray(split),
    )


def test_paper_proportions_stratified_disjoint_and_complete():
    s = _samples([400, 200, 40])
    sp = make_split(s, seed=0)
    assert sp.sizes() == (320, 160, 160)
    all_idx = np.concatenate([sp.train, sp.val, sp.test])
    assert len(np.unique(all_idx)) == len(s) == len(all_idx)
    for part, share in ((sp.train, 0.5), (sp.val, 0.25), (sp.test, 0.25)):
        counts = np.bincount(s.targets[part], minlength=3)
        np.testing.assert_array_equal(counts, np.array([400, 200, 40]) * share)


def test_odd_class_sizes_stay_stratified_within_one():
    s = _samples([7, 3, 13])
    sp = make_split(s, seed=5)
    for c, n in enumerate([7, 3, 13]):
        got = [int((s.targets[p] == c).sum()) for p in (sp.train, sp.val, sp.test)]
        assert sum(got) == n
        for g, share in zip(got, (0.5, 0.25, 0.25), strict=True):
            assert abs(g - n * share) < 1


def test_seed_is_deterministic_and_seeds_differ():
    s = _samples([50, 50])
    a, b, c = make_split(s, 1), make_split(s, 1), make_split(s, 2)
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)


def test_own_split_is_used_and_missing_val_carved_from_train():
    # class c0: 8 train; class c1: 4 train + 4 test; no val folder
    s = _samples([8, 8], split=["train"] * 12 + ["test"] * 4)
    sp = make_split(s, seed=0)
    assert sp.own
    np.testing.assert_array_equal(sp.test, np.arange(12, 16))
    # a third of each class's train is carved out (25 / (50 + 25)), largest-remainder rounded
    assert np.bincount(s.targets[sp.val], minlength=2).tolist() == [3, 1]
    assert np.bincount(s.targets[sp.train], minlength=2).tolist() == [5, 3]
    assert set(sp.val) <= set(range(12)) and not set(sp.val) & set(sp.train)


def test_too_few_samples_for_validation_is_an_error():
    with pytest.raises(DatasetError, match="the validation split is empty"):
        make_split(_samples([1, 1, 1]), seed=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_fractions_come_from_train_only_stratified_and_nested(seed):
    s = _samples([200, 100])
    sp = make_split(s, seed=seed)
    previous: set[int] = set()
    for f in PAPER_FRACTIONS:
        sub = train_fraction(s, sp.train, f, seed)
        assert set(sub) <= set(sp.train)
        counts = np.bincount(s.targets[sub], minlength=2)
        assert counts.tolist() == [round(100 * f / 100 + 1e-9), round(50 * f / 100 + 1e-9)]
        assert previous <= set(sub)  # smaller fractions are subsets of larger ones
        previous = set(sub)
    np.testing.assert_array_equal(train_fraction(s, sp.train, 100, seed), sp.train)


def test_fraction_that_empties_a_class():
    s = _samples([400, 8])
    sp = make_split(s, seed=0)  # class c1 has 4 training samples
    with pytest.raises(
        DatasetError,
        match=r"1% of the training split leaves class 'c1' with no sample \(it has 4\)",
    ):
        train_fraction(s, sp.train, 1, seed=0)
    assert len(train_fraction(s, sp.train, 20, seed=0)) == 40 + 1


def test_regression_split_and_fraction_keep_one_sample():
    s = _samples([40], task="regression")
    sp = make_split(s, seed=0)
    assert sp.sizes() == (20, 10, 10)
    assert len(train_fraction(s, sp.train, 1, seed=0)) == 1
