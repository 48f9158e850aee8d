"""Mini-batch K-means (Sculley 2010; the paper's choice in section 4.4) streamed over chunks.

The feature vectors are never all in memory: a *source* is a zero-argument callable that
restarts a stream of (n_i, dim) chunks in a fixed order (e.g. the tissue tiles of a feature
store, chunk by chunk). ``fit_streamed_kmeans``

1. draws a uniform random subset of at most ``sample`` rows (the fitting rows) and, in one pass,
   a k-means++ seed sample among them; the fitting rows stay in memory for the next steps when
   they fit in ``cache_bytes``, otherwise each step streams the source again;
2. runs mini-batch K-means passes over the fitting rows: shuffled in a bounded buffer, cut into
   batches, each batch one update of scikit-learn's rule (``MiniBatchKMeans.partial_fit``,
   re-done here with one BLAS product per batch);
3. polishes the centres with a few full Lloyd iterations over the fitting rows (assign, then
   mean), stopping at scikit-learn's KMeans tolerance; after the first, a pass recomputes only
   the rows whose distance bounds no longer prove their label (Hamerly 2010).

``fit_kmeans`` does the same on rows already in memory (the GUI's held table), with the same
result bit for bit; both take one :class:`KMeansSettings`.

Memory is bounded by the buffer and ``cache_bytes`` whatever the number of tiles; every tile is
assigned afterwards with ``assign`` chunk by chunk. Everything random derives from ``seed``.
Progress is reported as stage ``"kmeans"`` (rows read, fed to mini-batches and to Lloyd passes)
at least every 0.2 s; a ``Cancelled`` raised by the callback stops the fit (nothing is written).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from engine.progress import Progress, Throttle, no_progress

ChunkSource = Callable[[], Iterable[np.ndarray]]
"""Each call starts the stream again; it yields (n_i, dim) float arrays in the same order every time."""

DEFAULT_BATCH_SIZE = 2048
DEFAULT_BUFFER_ROWS = 65_536
DEFAULT_CACHE_BYTES = 1 << 30
_REFINE_BLOCK = 4096  # rows per BLAS call in the Lloyd passes (stays in cache)
STAGE = "kmeans"


@dataclass
class KMeansFit:
    """Result of ``fit_streamed_kmeans``.

    centroids: (k, dim) float32. n_fit: rows used for fitting. n_total: rows in the stream.
    passes: passes over the stream after seeding. steps: mini-batch updates. shift: mean squared
    centroid movement in the last pass relative to the data variance (convergence measure).
    """

    centroids: np.ndarray
    n_fit: int
    n_total: int
    passes: int
    steps: int
    shift: float


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """(n, dim) -> (n, dim) float32 rows of unit Euclidean norm (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def row_norms2(x: np.ndarray) -> np.ndarray:
    """(n, dim) float32 -> (n,) float32 squared Euclidean norms of the rows."""
    return np.einsum("ij,ij->i", x, x)


def count_rows(source: ChunkSource) -> int:
    """Number of rows the stream yields (one pass)."""
    return sum(int(np.shape(c)[0]) for c in source())


def _select(source: ChunkSource, chosen: np.ndarray | None) -> Iterable[np.ndarray]:
    """Stream the rows whose global index is in ``chosen`` (sorted int64; None: every row)."""
    offset = 0
    for chunk in source():
        if chosen is None:
            yield np.asarray(chunk, dtype=np.float32)
            continue
        n = int(np.shape(chunk)[0])
        lo, hi = np.searchsorted(chosen, [offset, offset + n])
        if hi > lo:
            yield np.asarray(chunk[chosen[lo:hi] - offset], dtype=np.float32)
        offset += n


def _rechunk(parts: Iterable[np.ndarray], size: int) -> Iterable[np.ndarray]:
    """Regroup a stream of (n_i, dim) parts into blocks of exactly ``size`` rows (last may be short)."""
    pending: list[np.ndarray] = []
    held = 0
    for part in parts:
        while len(part):
            take = min(size - held, len(part))
            pending.append(part[:take])
            held += take
            part = part[take:]
            if held == size:
                yield np.concatenate(pending, axis=0)
                pending, held = [], 0
    if held:
        yield np.concatenate(pending, axis=0)


def _choose(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Sorted int64 indices of ``m`` distinct rows out of ``n`` (all of them when m >= n)."""
    if m >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(rng.choice(n, size=m, replace=False).astype(np.int64))


def _members(labels: np.ndarray, counts: np.ndarray) -> sparse.csr_matrix:
    """(k, n) float32 0/1 CSR matrix, row c marking the rows labelled c (``counts`` = bincount).

    Built directly in CSR form (a stable sort of the labels): the same matrix, column order
    included, as ``csr_matrix((ones, (labels, arange(n))))`` without its COO conversion.
    """
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.argsort(labels, kind="stable")
    data = np.ones(len(labels), dtype=np.float32)
    return sparse.csr_matrix((data, indices, indptr), shape=(len(counts), len(labels)))


class MiniBatchKMeans:
    """Sculley's mini-batch K-means update, as scikit-learn's ``MiniBatchKMeans.partial_fit`` does it.

    Each centre is the running mean of every row ever assigned to it (per-centre learning rate
    1 / count); centres whose count falls below ``reassignment_ratio`` x the largest count move to
    random rows of the batch. Same rule as scikit-learn, done with one BLAS matrix product per
    batch: scikit-learn's per-batch overhead (validation, single-threaded Cython labelling) is
    about 15x the arithmetic for 2048 x 512 batches, which is the whole cost of a streamed fit.

    Args:
        centers: (k, dim) initial centres (copied to float32).
        seed: seeds the reassignment draws.
    """

    def __init__(
        self, centers: np.ndarray, seed: int = 0, reassignment_ratio: float = 0.01
    ) -> None:
        self.centers = np.array(centers, dtype=np.float32)
        self.counts = np.zeros(len(self.centers), dtype=np.float64)
        self.reassignment_ratio = float(reassignment_ratio)
        self.rng = np.random.default_rng(seed)
        self.n_steps = 0
        self._since_reassign = 0

    def partial_fit(self, x: np.ndarray) -> MiniBatchKMeans:
        """One update with the (n, dim) batch ``x``."""
        x = np.asarray(x, dtype=np.float32)
        k = len(self.centers)
        labels, _ = assign(x, self.centers, distances=False)
        n_b = np.bincount(labels, minlength=k)
        sums = np.asarray(_members(labels, n_b) @ x, dtype=np.float64)  # (k, dim) batch sums
        n_b = n_b.astype(np.float64)
        present = n_b > 0
        old = self.counts[present]
        new = old + n_b[present]
        self.centers[present] = (
            (self.centers[present] * old[:, None] + sums[present]) / new[:, None]
        ).astype(np.float32)
        self.counts[present] = new
        self._since_reassign += len(x)
        if self.reassignment_ratio > 0 and (
            (self.counts == 0).any() or self._since_reassign >= 10 * k
        ):
            self._since_reassign = 0
            self._reassign(x)
        self.n_steps += 1
        return self

    def _reassign(self, x: np.ndarray) -> None:
        to_move = self.counts < self.reassignment_ratio * self.counts.max()
        if to_move.sum() > 0.5 * len(x):  # never move more centres than half the batch
            to_move[np.argsort(self.counts)[int(0.5 * len(x)) :]] = False
        n = int(to_move.sum())
        if n == 0:
            return
        self.centers[to_move] = x[self.rng.choice(len(x), size=n, replace=False)]
        self.counts[to_move] = self.counts[~to_move].min() if (~to_move).any() else 0.0


@dataclass(frozen=True)
class KMeansSettings:
    """What decides a fit, the same for a streamed (:func:`fit_streamed_kmeans`) and an
    in-memory (:func:`fit_kmeans`) one: same settings and rows, same centroids, bit for bit.

    k: number of clusters.
    sample: at most this many rows, drawn uniformly without replacement, are used for fitting
        (None or 0: all rows).
    seed: seeds the row sample, the k-means++ seeding, the shuffles and reassignments.
    batch_size: rows per ``partial_fit`` update.
    max_passes: mini-batch passes over the fitting rows; stops earlier once a pass moves the
        centres by less than ``tol`` (as for ``refine_passes``).
    tol: convergence threshold on the total squared centre shift of a pass, relative to the
        mean feature variance (scikit-learn's KMeans rule).
    buffer_rows: consecutive fitting rows shuffled together before being cut into batches
        (bounds memory when streaming).
    init_size: rows of the k-means++ seed sample (default max(3 * batch_size, 10 * k)).
    reassignment_ratio: as in scikit-learn: centres with fewer than this share of the largest
        centre's count are moved to random points of a batch.
    refine_passes: full Lloyd iterations over the fitting rows after the mini-batch passes
        (assign, then every centre becomes the mean of its rows). Mini-batch centres stop
        moving once their counts are large; these passes take them to the nearby Lloyd fixed
        point that full K-means would reach. They stop once the shift is below ``tol``. Each
        pass after the first recomputes only the rows whose nearest centre may have changed
        (Hamerly's distance bounds), so a pass that moves few rows costs little.
    """

    k: int
    sample: int | None = None
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    max_passes: int = 3
    tol: float = 1e-4
    buffer_rows: int = DEFAULT_BUFFER_ROWS
    init_size: int | None = None
    reassignment_ratio: float = 0.01
    refine_passes: int = 10


def fit_streamed_kmeans(
    source: ChunkSource,
    settings: KMeansSettings,
    *,
    n_total: int | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress: Progress = no_progress,
) -> KMeansFit:
    """Fit ``settings.k`` centroids by mini-batch K-means on (a random subset of) ``source``'s rows.

    Args:
        source: restartable stream of (n_i, dim) float chunks (see ``ChunkSource``).
        settings: the fit's parameters (:class:`KMeansSettings`).
        n_total: rows in the stream (counted with an extra pass when None).
        cache_bytes: the fitting rows are kept in memory after the first pass when they take
            at most this many bytes (float32); otherwise every pass streams the source again.
        progress: ``progress("kmeans", done, total)`` with ``total`` = fitting rows x (1 +
            ``max_passes`` + ``refine_passes``): the seeding pass, the mini-batch passes, then
            the Lloyd passes; ``done`` jumps ahead when a phase stops early. Called at least
            every 0.2 s; a ``Cancelled`` it raises propagates (the fit is abandoned).
    Returns:
        ``KMeansFit`` with (k, dim) float32 centroids.
    """
    if n_total is None:
        n_total = count_rows(source)
    plan = _Plan.make(settings, n_total)
    report = Throttle(progress)
    report(STAGE, 0, plan.total)

    # One pass: the k-means++ seed sample, and the fitting rows kept in memory when they fit
    # in ``cache_bytes`` (then no later pass reads the source again).
    cache: np.ndarray | None = None
    use_cache = cache_bytes > 0
    init_parts: list[np.ndarray] = []
    seen = 0
    for part in _select(source, plan.chosen):
        lo, hi = np.searchsorted(plan.init_idx, [seen, seen + len(part)])
        init_parts.append(part[plan.init_idx[lo:hi] - seen])
        if use_cache and cache is None:
            use_cache = plan.n_fit * part.shape[1] * 4 <= cache_bytes
            cache = np.empty((plan.n_fit, part.shape[1]), np.float32) if use_cache else None
        if cache is not None:
            cache[seen : seen + len(part)] = part
        seen += len(part)
        report(STAGE, seen, plan.total)
    init_x = np.concatenate(init_parts, axis=0)
    del init_parts

    def blocks(size: int) -> Iterable[np.ndarray]:
        """The fitting rows in order, in blocks of exactly ``size`` rows (the last may be short)."""
        if cache is not None:
            yield from (cache[s : s + size] for s in range(0, plan.n_fit, size))
            return
        yield from _rechunk(_select(source, plan.chosen), size)

    return _descend(plan, init_x, blocks, report)


def fit_kmeans(
    x: np.ndarray,
    settings: KMeansSettings,
    *,
    sq: np.ndarray | None = None,
    progress: Progress = no_progress,
) -> KMeansFit:
    """``fit_streamed_kmeans`` on rows already in memory: the same centroids, bit for bit.

    ``x`` is (n, dim) float32 (e.g. ``ClusterFeatures``' table); with ``sample`` >= n it is
    used in place (no copy), otherwise the drawn rows are gathered once. ``sq``: (n,) its
    squared row norms (:func:`row_norms2`) when the caller holds them. The progress totals
    are those of :func:`fit_streamed_kmeans` (the seeding pass, which reads nothing here, is
    reported done at once).
    """
    x = np.asarray(x, dtype=np.float32)
    plan = _Plan.make(settings, len(x))
    report = Throttle(progress)
    report(STAGE, 0, plan.total)
    rows = x if plan.chosen is None else x[plan.chosen]
    if sq is not None and plan.chosen is not None:
        sq = sq[plan.chosen]
    init_x = rows[plan.init_idx]
    report(STAGE, plan.n_fit, plan.total)

    def blocks(size: int) -> Iterable[np.ndarray]:
        yield from (rows[s : s + size] for s in range(0, plan.n_fit, size))

    return _descend(plan, init_x, blocks, report, sq)


@dataclass(frozen=True)
class _Plan:
    """What a fit draws before reading: the fitting rows, the seed sample, the progress total."""

    settings: KMeansSettings
    n_total: int
    n_fit: int
    chosen: np.ndarray | None  # sorted row indices of the fitting rows (None: every row)
    init_idx: np.ndarray  # sorted indices, among the fitting rows, of the k-means++ sample
    rng: np.random.Generator  # continues into the shuffles of the mini-batch passes

    @property
    def k(self) -> int:
        return self.settings.k

    @property
    def total(self) -> int:
        s = self.settings
        return self.n_fit * (1 + s.max_passes + s.refine_passes)

    @classmethod
    def make(cls, settings: KMeansSettings, n_total: int) -> _Plan:
        k, sample = settings.k, settings.sample
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        n_fit = n_total if not sample else min(int(sample), n_total)
        if n_fit < k:
            raise ValueError(f"cannot fit {k} clusters on {n_fit} rows; lower k or add tiles")
        rng = np.random.default_rng(settings.seed)
        chosen = None if n_fit == n_total else _choose(rng, n_total, n_fit)
        init_size = settings.init_size or max(3 * settings.batch_size, 10 * k)
        init_idx = _choose(rng, n_fit, min(n_fit, init_size))
        return cls(settings, n_total, n_fit, chosen, init_idx, rng)


Blocks = Callable[[int], Iterable[np.ndarray]]
"""``blocks(size)``: the fitting rows in order, in blocks of ``size`` rows (the last may be short)."""


def _descend(
    plan: _Plan,
    init_x: np.ndarray,
    blocks: Blocks,
    report: Progress,
    sq: np.ndarray | None = None,
) -> KMeansFit:
    """k-means++ on ``init_x``, the mini-batch passes, then the Lloyd passes over ``blocks``.

    ``sq``: (n_fit,) squared norms of the fitting rows (computed in the first Lloyd pass when
    None; the same values, row by row).
    """
    from sklearn.cluster import kmeans_plusplus
    from threadpoolctl import threadpool_limits

    variance = float(np.var(init_x, axis=0).mean()) or 1.0
    # Small matrix products from here on: one BLAS thread is faster, as in scikit-learn's
    # mini-batch step, and far steadier when other processes share the cores (k-means++ on
    # the seed sample is 3x faster so on 2 busy cores).
    blas = threadpool_limits(limits=1, user_api="blas")
    try:
        centers, _ = kmeans_plusplus(
            init_x.astype(np.float64), plan.k, random_state=plan.settings.seed
        )
        del init_x
        centers, steps, passes = _minibatch_passes(plan, centers, blocks, variance, report)
        report(STAGE, plan.n_fit * (1 + plan.settings.max_passes), plan.total)
        centers, refined, shift = _lloyd_passes(plan, centers, blocks, variance, report, sq)
    finally:
        blas.restore_original_limits()
    report(STAGE, plan.total, plan.total)
    return KMeansFit(
        centroids=centers,
        n_fit=plan.n_fit,
        n_total=plan.n_total,
        passes=passes + refined,
        steps=steps,
        shift=shift,
    )


def _minibatch_passes(
    plan: _Plan, centers: np.ndarray, blocks: Blocks, variance: float, report: Progress
) -> tuple[np.ndarray, int, int]:
    """Mini-batch passes: each block of ``buffer_rows`` shuffled, then cut into batches.

    Returns the (k, dim) float32 centres, the updates made and the passes run.
    """
    s = plan.settings
    model = MiniBatchKMeans(centers, seed=s.seed, reassignment_ratio=s.reassignment_ratio)
    steps, passes = 0, 0
    done = plan.n_fit
    for _ in range(s.max_passes):
        before = model.centers.copy()
        for block in blocks(s.buffer_rows):
            order = plan.rng.permutation(len(block))
            starts = list(range(0, len(block), s.batch_size))
            if len(starts) > 1 and len(block) - starts[-1] < s.batch_size // 2:
                starts.pop()  # fold a short tail into the previous batch
            for i, start in enumerate(starts):
                end = starts[i + 1] if i + 1 < len(starts) else len(block)
                model.partial_fit(block[order[start:end]])
                steps += 1
                done += end - start
                report(STAGE, done, plan.total)
        passes += 1
        shift = float(((model.centers - before) ** 2).sum()) / variance
        if passes > 1 and shift <= s.tol:
            break
    return model.centers.copy(), steps, passes


def _lloyd_passes(
    plan: _Plan,
    centers: np.ndarray,
    blocks: Blocks,
    variance: float,
    report: Progress,
    sq: np.ndarray | None = None,
) -> tuple[np.ndarray, int, float]:
    """Lloyd passes: every centre becomes the mean of the fitting rows nearest to it.

    The first pass assigns every row and keeps, per row, its label, an upper bound on the
    distance to its centre and a lower bound on the distance to every other centre. When the
    centres move by delta, the bounds widen by delta (Hamerly 2010); a later pass recomputes
    only the rows whose bounds no longer prove their label, and moves the rows that changed
    label from one centre's sum to the other's. The labels are those of a full assignment
    (distances within float32 rounding of a tie excepted), at a fraction of its cost once
    few rows move (a block whose rows are mostly unproven is recomputed whole: a row proven
    keeps its label either way). Returns the (k, dim) float32 centres, the passes run and the
    last shift.
    """
    s = plan.settings
    k, n = plan.k, plan.n_fit
    centers = np.asarray(centers, np.float32)
    labels = np.empty(n, np.int64)
    upper = np.empty(n)  # >= distance of each row to its centre
    lower = np.empty(n)  # <= distance of each row to every other centre
    known = sq is not None
    sq = np.empty(n, np.float32) if sq is None else sq  # squared norm of each row
    sums = np.zeros(centers.shape, np.float64)
    counts = np.zeros(k, np.int64)
    active: np.ndarray | None = None  # rows to recompute (None: the first pass, every row)
    done = plan.n_fit * (1 + s.max_passes)
    passes, shift = 0, math.inf
    for _ in range(s.refine_passes):
        at = 0
        for block in blocks(_REFINE_BLOCK):
            b = len(block)
            if active is None:
                if not known:
                    sq[at : at + b] = row_norms2(block)
                lab, upper[at : at + b], lower[at : at + b] = _two_nearest(
                    block, sq[at : at + b], centers
                )
                labels[at : at + b] = lab
                n_b = np.bincount(lab, minlength=k)
                sums += _members(lab, n_b) @ block
                counts += n_b
            else:
                idx = np.flatnonzero(active[at : at + b])
                if 2 * len(idx) > b:  # most rows: the whole block costs less than a gather
                    idx = np.arange(b)
                if len(idx):
                    rows, where = (block if len(idx) == b else block[idx]), at + idx
                    lab, upper[where], lower[where] = _two_nearest(rows, sq[where], centers)
                    moved = lab != labels[where]
                    if moved.any():
                        _move(sums, counts, rows[moved], labels[where[moved]], lab[moved])
                        labels[where[moved]] = lab[moved]
            at += b
            done += b
            report(STAGE, done, plan.total)
        before = centers
        centers = np.where(
            counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], before
        ).astype(np.float32)
        passes += 1
        shift = float(((centers - before) ** 2).sum()) / variance  # scikit-learn's KMeans rule
        if shift <= s.tol:
            break
        active = _widen(labels, upper, lower, before, centers)
    return centers, passes, shift


def _two_nearest(
    x: np.ndarray, sq: np.ndarray, centers: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels (n,) int64 of the nearest centre of each row (lowest index on ties), an upper
    bound (n,) float64 on the distance to it and a lower bound on the distance to the next.

    ``sq``: (n,) squared row norms. The bounds allow for float32 rounding of the products.
    """
    c = centers
    cc = (c * c).sum(axis=1)
    d2 = cc[None, :] - 2.0 * (x @ c.T)  # ||x||^2 is constant per row
    labels = np.argmin(d2, axis=1).astype(np.int64)
    rows = np.arange(len(x))
    best = d2[rows, labels].astype(np.float64)
    if len(c) > 1:
        d2[rows, labels] = np.inf
        second = d2.min(axis=1).astype(np.float64)
    else:
        second = np.full(len(x), np.inf)
    slack = 1e-5 * (sq.astype(np.float64) + float(cc.max()))  # rounding of a 512-term product
    base = sq.astype(np.float64)
    upper = np.sqrt(np.maximum(best + base + slack, 0.0))
    lower = np.sqrt(np.maximum(second + base - slack, 0.0))
    return labels, upper, lower


def _move(
    sums: np.ndarray, counts: np.ndarray, rows: np.ndarray, old: np.ndarray, new: np.ndarray
) -> None:
    """Move ``rows`` (m, dim) from the sums and counts of clusters ``old`` to those of ``new``."""
    k = len(counts)
    n_old, n_new = np.bincount(old, minlength=k), np.bincount(new, minlength=k)
    sums -= _members(old, n_old) @ rows
    sums += _members(new, n_new) @ rows
    counts += n_new - n_old


def _widen(
    labels: np.ndarray,
    upper: np.ndarray,
    lower: np.ndarray,
    before: np.ndarray,
    after: np.ndarray,
) -> np.ndarray:
    """Widen the bounds by the centres' moves (in place); (n,) bool rows to recompute.

    A row keeps its label when its distance to its centre is below the distance to every
    other centre (``lower``) or below half the distance from its centre to the nearest other
    centre (then no other centre can be nearer).
    """
    a = after.astype(np.float64)
    delta = np.sqrt(((a - before.astype(np.float64)) ** 2).sum(axis=1))
    upper += delta[labels]
    if len(delta) > 1:
        top = np.argsort(delta)[-2:]  # the two largest moves: [second, first]
        lower -= np.where(labels == top[1], delta[top[0]], delta[top[1]])
        between = np.sqrt(np.maximum(((a[:, None, :] - a[None, :, :]) ** 2).sum(axis=2), 0.0))
        np.fill_diagonal(between, np.inf)
        half = 0.5 * between.min(axis=1) * (1 - 1e-6)
    else:
        half = np.full(1, np.inf)
    return upper > np.maximum(lower, half[labels])


def assign(
    x: np.ndarray, centroids: np.ndarray, distances: bool = True, sq: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Nearest centroid of each row.

    Args:
        x: (n, dim) float features; centroids: (k, dim) float32.
        sq: (n,) float32 squared row norms, ``row_norms2(x)``, when the caller holds them
            (the distances are then the same, bit for bit, without reading ``x`` again).
    Returns:
        labels (n,) int64 (lowest index on ties) and Euclidean distances (n,) float32 to it
        (None when ``distances`` is False).
    """
    x = np.asarray(x, dtype=np.float32)
    c = np.asarray(centroids, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    d2 = (c * c).sum(axis=1)[None, :] - 2.0 * (x @ c.T)  # ||x||^2 is constant per row
    labels = np.argmin(d2, axis=1).astype(np.int64)
    if not distances:
        return labels, None
    d2min = np.take_along_axis(d2, labels[:, None], axis=1)[:, 0] + (
        row_norms2(x) if sq is None else sq
    )
    return labels, np.sqrt(np.maximum(d2min, 0.0)).astype(np.float32)


def assign_stream(
    source: ChunkSource, centroids: np.ndarray
) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """``assign`` applied chunk by chunk: yields (labels, distances) per chunk of ``source``."""
    for chunk in source():
        yield assign(chunk, centroids)
