"""Lasso selection on the map: a polygon in map coordinates -> the tiles inside it.

Inside is the even-odd (crossing-number) rule, the rule of ``matplotlib.path.Path`` and of
napari's shapes: a point is inside when a ray from it towards +x crosses the polygon's edges an
odd number of times. An edge counts when one end is strictly above the point's y and the other
at or below it, so a point on a horizontal edge or a shared vertex is counted once.
"""

from __future__ import annotations

import numpy as np

from engine.curation import Curation
from engine.tile_map import TileMap

__all__ = ["apply_lasso", "inside_polygon", "lasso_tiles"]


def inside_polygon(points: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """(N,) bool: which of ``points`` (N, 2) (x, y) lie inside ``polygon`` (M, 2) (x, y), M >= 3.

    The polygon is closed implicitly (last vertex joins the first); O(N * M) vectorised over points.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    poly = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    out = np.zeros(len(pts), dtype=bool)
    if len(poly) < 3 or not len(pts):
        return out
    x, y = pts[:, 0], pts[:, 1]
    lo, hi = poly.min(0), poly.max(0)
    box = (x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1])
    x, y = x[box], y[box]
    hit = np.zeros(len(x), dtype=bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for ax, ay, bx, by in zip(x1, y1, x2, y2, strict=True):
        if ay == by:
            continue  # a horizontal edge never crosses a horizontal ray
        straddle = (ay > y) != (by > y)
        t = (y - ay) / (by - ay)
        hit ^= straddle & (x < ax + t * (bx - ax))
    out[np.flatnonzero(box)] = hit
    return out


def lasso_tiles(tile_map: TileMap, polygon: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{slide_id: (rows, cols) int64} of the map's tiles inside ``polygon`` (M, 2) map (x, y)."""
    return tile_map.by_slide(np.flatnonzero(inside_polygon(tile_map.xy, polygon)))


def apply_lasso(
    curation: Curation, tile_map: TileMap, polygon: np.ndarray, name: str | None
) -> int:
    """Override the class of every tile inside ``polygon``: ``name``, or excluded when None.

    One :meth:`Curation.override_tiles` per slide (so observers redraw each slide once);
    returns how many tiles were overridden.
    """
    n = 0
    for sid, (rows, cols) in lasso_tiles(tile_map, polygon).items():
        curation.override_tiles(sid, rows, cols, name)
        n += len(rows)
    return n
