"""The paper's splits: 50% train / 25% validation / 25% test, stratified, from a seed; and
training fractions (1, 2, 5, ... 100%) drawn from the training split only.

Stratification is exact per class (largest-remainder rounding of each class's quota), so it
also works for classes with one or two samples, where scikit-learn's splitters refuse. For
regression and segmentation the samples form one group (a plain random split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.evaluate.datasets import DatasetError, Samples

__all__ = ["PAPER_FRACTIONS", "PAPER_RATIOS", "Split", "make_split", "train_fraction"]

PAPER_RATIOS: tuple[float, float, float] = (0.5, 0.25, 0.25)
PAPER_FRACTIONS: tuple[float, ...] = (1, 2, 5, 10, 20, 50, 75, 100)


@dataclass(frozen=True)
class Split:
    """Indices (int64) into a :class:`Samples` for each part; disjoint."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    own: bool = False  # True when the dataset's own train/val/test was used

    def sizes(self) -> tuple[int, int, int]:
        """(n_train, n_val, n_test)."""
        return len(self.train), len(self.val), len(self.test)


def _groups(samples: Samples) -> np.ndarray:
    """(N,) group id used for stratification: the class, or 0 when there are no classes."""
    if samples.task == "classification":
        return samples.targets
    return np.zeros(len(samples), dtype=np.int64)


def _quotas(n: int, ratios: tuple[float, ...]) -> list[int]:
    """Split ``n`` items by ``ratios`` with largest-remainder rounding; ties go to the earlier part."""
    raw = [n * r / sum(ratios) for r in ratios]
    counts = [int(np.floor(x)) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _stratified(
    idx: np.ndarray, groups: np.ndarray, ratios: tuple[float, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in ratios]
    for g in np.unique(groups):
        members = rng.permutation(idx[groups == g])
        start = 0
        for k, count in enumerate(_quotas(len(members), ratios)):
            parts[k].append(members[start : start + count])
            start += count
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def make_split(
    samples: Samples, seed: int, ratios: tuple[float, float, float] = PAPER_RATIOS
) -> Split:
    """Split ``samples`` into train/val/test.

    With the dataset's own split (``samples.split``) that split is used; a missing ``val`` (or
    ``test``) part is carved from ``train`` in the proportion of ``ratios``. Otherwise a stratified
    random split by ``ratios`` from ``seed``. Raises :class:`DatasetError` if validation or test
    come out empty.
    """
    groups = _groups(samples)
    rng = np.random.default_rng([int(seed), 7])
    if samples.split is not None:
        parts = {name: np.flatnonzero(samples.split == name) for name in ("train", "val", "test")}
        for missing in ("val", "test"):
            if len(parts[missing]) == 0:
                r_missing = ratios[1] if missing == "val" else ratios[2]
                keep, carved = _stratified(
                    parts["train"], groups[parts["train"]], (ratios[0], r_missing), rng
                )
                parts["train"], parts[missing] = keep, carved
        split = Split(parts["train"], parts["val"], parts["test"], own=True)
    else:
        train, val, test = _stratified(np.arange(len(samples)), groups, ratios, rng)
        split = Split(train, val, test)
    for name, part in (("training", split.train), ("validation", split.val), ("test", split.test)):
        if len(part) == 0:
            raise DatasetError(
                f"{samples.root}: the {name} split is empty ({len(samples)} samples in all) — "
                "use a dataset with more samples per class"
            )
    return split


def _fraction_count(n: int, fraction_pct: float) -> int:
    return min(n, int(np.floor(n * fraction_pct / 100.0 + 0.5)))


def train_fraction(
    samples: Samples, train_idx: np.ndarray, fraction_pct: float, seed: int
) -> np.ndarray:
    """``fraction_pct`` percent of ``train_idx``, stratified per class, from ``seed``.

    Each class keeps ``round(fraction * n_class)`` samples, taken as a prefix of a seeded
    permutation, so smaller fractions are subsets of larger ones for the same seed. Raises
    :class:`DatasetError` if a class would keep no sample.
    """
    if not 0 < fraction_pct <= 100:
        raise DatasetError(f"--fractions: {fraction_pct}% is not in (0, 100] — use percentages")
    groups = _groups(samples)[train_idx]
    chosen: list[np.ndarray] = []
    for g in np.unique(groups):
        members = train_idx[groups == g]
        rng = np.random.default_rng([int(seed), 11, int(g)])
        members = rng.permutation(members)
        count = _fraction_count(len(members), fraction_pct)
        if samples.task != "classification":
            count = max(count, 1)
        if count == 0:
            need = 100.0 * 0.5 / len(members)
            raise DatasetError(
                f"{samples.root}: {fraction_pct:g}% of the training split leaves class "
                f"{samples.classes[int(g)]!r} with no sample (it has {len(members)}) — "
                f"use fractions of at least {need:.3g}%"
            )
        chosen.append(members[:count])
    # every class that exists in the dataset must be in the training split at all
    if samples.task == "classification":
        absent = sorted(set(range(samples.num_classes)) - {int(g) for g in np.unique(groups)})
        if absent:
            raise DatasetError(
                f"{samples.root}: class {samples.classes[absent[0]]!r} has no training sample — "
                "add samples of that class to the training split"
            )
    return np.sort(np.concatenate(chosen))
