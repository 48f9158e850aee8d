"""The map's tiles as flat arrays: where each tile lies on the map, and which tile lies where.

A :class:`TileMap` is what the map view holds (Qt-free; the napari map window only shows it):

- ``xy`` (N, 2) float32 map coordinates (x, y) of every tile of a cluster run, as
  ``engine.embed`` stored them (``FeatureStore.read_embedding``);
- ``slide`` (N,) int32 index into ``slide_ids``, ``rows``, ``cols`` (N,) int32 its tile-grid
  position, ``labels`` (N,) int16 its cluster in the run.

Tile lookup goes both ways: :meth:`TileMap.nearest` (map point -> tile, for hover and click) and
:meth:`TileMap.index_of` (slide tile -> map point, for highlighting the tile under the cursor in
the slide viewer). Tiles are ordered slide by slide (``slide_ids`` sorted), row-major.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from engine.store import FeatureStore

__all__ = ["TileMap"]


@dataclass(frozen=True, eq=False)
class TileMap:
    """Tiles of one cluster run on the map (see the module docstring for the arrays)."""

    slide_ids: tuple[str, ...]
    slide: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    xy: np.ndarray
    labels: np.ndarray
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """(rows, cols) of each slide's tile grid."""

    @classmethod
    def from_grids(
        cls, xy_by_slide: Mapping[str, np.ndarray], labels_by_slide: Mapping[str, np.ndarray]
    ) -> TileMap:
        """From per-slide grids: ``xy`` (rows, cols, 2), NaN where no tile; ``labels`` (rows, cols)."""
        ids = tuple(sorted(xy_by_slide))
        parts = []
        for i, sid in enumerate(ids):
            grid = np.asarray(xy_by_slide[sid], dtype=np.float32)
            r, c = np.nonzero(np.isfinite(grid[..., 0]))
            lab = np.asarray(labels_by_slide[sid])[r, c].astype(np.int16)
            parts.append((np.full(len(r), i, np.int32), r, c, grid[r, c], lab))
        if not parts:
            e = np.zeros(0, np.int32)
            return cls(ids, e, e, e, np.zeros((0, 2), np.float32), e.astype(np.int16))
        s, r, c, xy, lab = (np.concatenate(p) for p in zip(*parts, strict=True))
        shapes = {sid: tuple(int(v) for v in xy_by_slide[sid].shape[:2]) for sid in ids}
        return cls(ids, s, r.astype(np.int32), c.astype(np.int32), xy.reshape(-1, 2), lab, shapes)

    @classmethod
    def from_store(cls, store: FeatureStore, run: str) -> TileMap:
        """The map of ``run`` as ``engine.embed`` stored it (the slides written so far)."""
        xy = store.read_embedding(run)
        return cls.from_grids(xy, {sid: store.read_cluster_labels(run, sid) for sid in xy})

    def __len__(self) -> int:
        return len(self.xy)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the tiles' coordinates ((0, 0, 1, 1) for an empty map)."""
        if not len(self):
            return 0.0, 0.0, 1.0, 1.0
        lo, hi = self.xy.min(0), self.xy.max(0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])

    def tile(self, i: int) -> tuple[str, int, int]:
        """(slide_id, row, col) of tile ``i``."""
        return self.slide_ids[int(self.slide[i])], int(self.rows[i]), int(self.cols[i])

    @cached_property
    def _tree(self):
        from scipy.spatial import cKDTree

        return cKDTree(self.xy)

    def nearest(self, x: float, y: float, max_distance: float | None = None) -> int | None:
        """Index of the tile nearest map point (x, y), or None (empty map, or none within ``max_distance``)."""
        if not len(self):
            return None
        d, i = self._tree.query((float(x), float(y)))
        if max_distance is not None and d > max_distance:
            return None
        return int(i)

    @cached_property
    def _index_grids(self) -> dict[str, np.ndarray]:
        out = {}
        for i, sid in enumerate(self.slide_ids):
            sel = np.flatnonzero(self.slide == i)
            shape = self.shapes.get(sid) or (
                int(self.rows[sel].max()) + 1 if len(sel) else 0,
                int(self.cols[sel].max()) + 1 if len(sel) else 0,
            )
            grid = np.full(shape, -1, np.int64)
            grid[self.rows[sel], self.cols[sel]] = sel
            out[sid] = grid
        return out

    def index_of(self, slide_id: str, row: int, col: int) -> int | None:
        """Index of tile (slide_id, row, col) on the map, or None when it has no map point."""
        grid = self._index_grids.get(slide_id)
        if grid is None or not (0 <= row < grid.shape[0] and 0 <= col < grid.shape[1]):
            return None
        i = int(grid[row, col])
        return i if i >= 0 else None

    def by_slide(
        self, indices: Sequence[int] | np.ndarray
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{slide_id: (rows, cols) int64} of the tiles ``indices``, sorted row-major per slide."""
        idx = np.unique(np.asarray(indices, dtype=np.int64))
        out = {}
        for i, sid in enumerate(self.slide_ids):
            sel = idx[self.slide[idx] == i]
            if len(sel):
                out[sid] = (self.rows[sel].astype(np.int64), self.cols[sel].astype(np.int64))
        return out
