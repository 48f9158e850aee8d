"""Approximate nearest neighbours by coarse cells (an inverted file), deterministic and JIT-free.

The map's UMAP needs the k nearest sample tiles of every tile. ``pynndescent`` (UMAP's default)
compiles ~40 s of numba code in every new process, more than the whole map's budget on two
cores; exact search costs ``n * m * d`` (25 CPU-s for 50,000 x 50,000 at d = 50). This index
cuts the data into ``cells`` Lloyd cells and searches, for the queries of one cell, the points
of the ``probe`` cells whose centres lie nearest that cell's centre: each query then meets
about ``probe / cells`` of the data. Distances of the chosen neighbours are recomputed as
``||q - x||`` directly, so a point's distance to itself is exactly 0.

:class:`CellIndex` has the ``query(X, k, epsilon)`` / ``_angular_trees`` shape of the search
index ``umap.UMAP.transform`` calls, so it can stand in for ``pynndescent.NNDescent`` there.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CellIndex"]

_BLOCK = 1 << 24  # distance-matrix entries per block (64 MiB of float32)


def _sq_dist(q: np.ndarray, x: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(len(q), len(x)) squared Euclidean distances (up to the constant ||q||^2, added back)."""
    d = xx[None, :] - 2.0 * (q @ x.T)
    d += (q * q).sum(1)[:, None]
    return d


def _top_k(q: np.ndarray, cand: np.ndarray, xc: np.ndarray, xxc: np.ndarray, k: int):
    """Indices (into the data) and distances of the ``k`` nearest of the candidates ``cand``
    (points ``xc``, squared norms ``xxc``) to each row of ``q``."""
    k_eff = min(k, len(cand))
    idx = np.empty((len(q), k_eff), np.int64)
    step = max(1, _BLOCK // max(1, len(cand)))
    for s in range(0, len(q), step):
        d = _sq_dist(q[s : s + step], xc, xxc)
        if k_eff < len(cand):
            part = np.argpartition(d, k_eff - 1, axis=1)[:, :k_eff]
        else:
            part = np.broadcast_to(np.arange(len(cand)), d.shape)
        order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
        idx[s : s + step] = np.take_along_axis(part, order, 1)
    exact = np.sqrt(((q[:, None, :] - xc[idx]) ** 2).sum(-1)).astype(np.float32)
    idx = cand[idx]
    order = np.argsort(exact, axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1), np.take_along_axis(exact, order, 1)


class CellIndex:
    """Nearest neighbours among ``data`` (m, d) float32 by coarse cells.

    Args:
        data: (m, d) the points searched.
        cells: number of coarse cells (default ~sqrt(m); 1 = exact search).
        probe: cells searched for each query cell (more = better recall, slower).
        seed: seed of the cell centres' initial choice.
    """

    _angular_trees = False  # the attribute umap.UMAP.transform reads off its search index

    def __init__(
        self, data: np.ndarray, cells: int | None = None, probe: int = 8, seed: int = 0
    ) -> None:
        self.data = np.ascontiguousarray(data, dtype=np.float32)
        m = len(self.data)
        if cells is None:
            cells = int(round(np.sqrt(m))) if m >= 4096 else 1
        self.cells = max(1, min(int(cells), m))
        self.probe = max(1, min(int(probe), self.cells))
        self._xx = (self.data * self.data).sum(1)
        self.centres = self._fit_centres(seed)
        self.cell_of = self._nearest_centre(self.data)
        order = np.argsort(self.cell_of, kind="stable")
        bounds = np.searchsorted(self.cell_of[order], np.arange(self.cells + 1))
        self._members = [order[bounds[c] : bounds[c + 1]] for c in range(self.cells)]
        cc = (self.centres * self.centres).sum(1)
        near = _sq_dist(self.centres, self.centres, cc)
        self._probes = np.argsort(near, axis=1, kind="stable")[:, : self.probe]
        self._candidates: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _candidates_of(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, points, squared norms) searched for queries of cell ``c`` (kept: at most
        ``probe`` x the data's size in memory over all cells)."""
        got = self._candidates.get(c)
        if got is None:
            cand = np.concatenate([self._members[p] for p in self._probes[c]])
            got = self._candidates[c] = (cand, self.data[cand], self._xx[cand])
        return got

    def _fit_centres(self, seed: int, iters: int = 8) -> np.ndarray:
        """(cells, d) centres: a few Lloyd passes over a seeded subsample of at most 64 per cell."""
        m = len(self.data)
        if self.cells == 1:
            return self.data.mean(0, keepdims=True)
        rng = np.random.default_rng(seed)
        sub = self.data[np.sort(rng.choice(m, min(m, 64 * self.cells), replace=False))]
        centres = sub[np.sort(rng.choice(len(sub), self.cells, replace=False))].copy()
        for _ in range(iters):
            lab = np.argmin(_sq_dist(sub, centres, (centres * centres).sum(1)), axis=1)
            counts = np.bincount(lab, minlength=self.cells)
            sums = np.zeros_like(centres)
            np.add.at(sums, lab, sub)
            full = counts > 0
            centres[full] = sums[full] / counts[full, None]
        return centres

    def _nearest_centre(self, x: np.ndarray) -> np.ndarray:
        cc = (self.centres * self.centres).sum(1)
        out = np.empty(len(x), np.int64)
        step = max(1, _BLOCK // self.cells)
        for s in range(0, len(x), step):
            out[s : s + step] = np.argmin(_sq_dist(x[s : s + step], self.centres, cc), axis=1)
        return out

    def query(
        self, queries: np.ndarray, k: int, epsilon: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(indices (n, k) int32, distances (n, k) float32), nearest first, of each query's
        ``k`` nearest points (``epsilon`` is accepted for UMAP and ignored)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = int(k)
        idx = np.full((len(q), k), -1, np.int32)
        dist = np.full((len(q), k), np.inf, np.float32)
        cell = self._nearest_centre(q)
        for c in np.unique(cell):
            rows = np.flatnonzero(cell == c)
            cand, xc, xxc = self._candidates_of(int(c))
            if len(cand) == 0:
                continue
            i, d = _top_k(q[rows], cand, xc, xxc, k)
            idx[rows, : i.shape[1]] = i
            dist[rows, : d.shape[1]] = d
        return idx, dist

    def neighbor_graph(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, distances) (m, k) of every indexed point's ``k`` nearest, itself first."""
        idx, dist = self.query(self.data, k)
        # A point is its own nearest (distance exactly 0); put it first where ties moved it.
        me = np.arange(len(self.data))
        for j in range(1, k):
            swap = idx[:, j] == me
            if swap.any():
                idx[swap, j], idx[swap, 0] = idx[swap, 0], me[swap]
                dist[swap, j], dist[swap, 0] = dist[swap, 0], 0.0
        return idx, dist
