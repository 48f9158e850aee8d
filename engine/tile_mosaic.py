"""The map mosaic: the map plane cut into a grid, each occupied cell shown by one real tile.

Geometry (map -> grid -> image). The grid covers the *square* box around the tiles' map
coordinates (side ``s`` = the larger extent, plus 1 % margin on each side, centred), so cells
are square in map units. With ``G`` cells a side and origin (x0, y0)::

    cell col = floor((x - x0) / s * G),   cell row = floor((y - y0) / s * G)   (clipped to G - 1)
    image px (row, col) = ((y - y0) / s * G * cell_px, (x - x0) / s * G * cell_px)

so map y grows downwards in the image, as napari draws rows. Each occupied cell shows the
tile whose map point lies nearest the cell's centre (ties: the lower tile index). The per-cell
arrays (tile counts, chosen tile, majority cluster) come with it; the thumbnails are read from
the slides through ``engine.slide.SlideCache``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.errors import SlideError, one_line
from engine.progress import Progress, Throttle, no_progress
from engine.slide import SlideCache
from engine.store import FeatureStore
from engine.tile_map import TileMap

__all__ = ["MosaicGrid", "cluster_overlay", "mosaic_grid", "mosaic_image", "read_thumbnails"]

_EMPTY = 255  # white where a cell holds no tile
_GREY = 200  # a cell whose tile cannot be read


@dataclass(frozen=True, eq=False)
class MosaicGrid:
    """The grid of a map (see the module docstring).

    origin: (x0, y0) map coordinates of the grid's top-left corner; side: its side in map units;
    size: G cells a side. cell: (N,) int64 flat cell (row * G + col) of each tile.
    counts: (G, G) int64 tiles per cell. chosen: (G, G) int64 tile nearest each cell's centre,
    -1 where empty. cluster: (G, G) int16 the majority cluster of each cell's tiles (ties: the
    lower cluster), -1 where empty.
    """

    origin: tuple[float, float]
    side: float
    size: int
    cell: np.ndarray
    counts: np.ndarray
    chosen: np.ndarray
    cluster: np.ndarray

    def cell_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int64 grid cells of map points ``xy`` (N, 2), clipped into the grid."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        g = self.size
        col = np.floor((xy[:, 0] - self.origin[0]) / self.side * g).astype(np.int64)
        row = np.floor((xy[:, 1] - self.origin[1]) / self.side * g).astype(np.int64)
        return np.clip(row, 0, g - 1), np.clip(col, 0, g - 1)

    def to_pixels(self, xy: np.ndarray, cell_px: int) -> np.ndarray:
        """(N, 2) float64 image (row, col) pixels of map points ``xy`` (N, 2) (x, y)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        scale = self.size * cell_px / self.side
        return np.stack(
            [(xy[:, 1] - self.origin[1]) * scale, (xy[:, 0] - self.origin[0]) * scale], axis=1
        )

    def to_map(self, pixels: np.ndarray, cell_px: int) -> np.ndarray:
        """(N, 2) map (x, y) of image (row, col) ``pixels`` (N, 2): the inverse of :meth:`to_pixels`."""
        px = np.asarray(pixels, dtype=np.float64).reshape(-1, 2)
        scale = self.side / (self.size * cell_px)
        return np.stack([px[:, 1] * scale + self.origin[0], px[:, 0] * scale + self.origin[1]], 1)

    def centre(self, row: int, col: int) -> tuple[float, float]:
        """Map (x, y) of a cell's centre."""
        step = self.side / self.size
        return self.origin[0] + (col + 0.5) * step, self.origin[1] + (row + 0.5) * step


def mosaic_grid(tile_map: TileMap, size: int = 64) -> MosaicGrid:
    """Cut ``tile_map``'s plane into ``size`` x ``size`` cells (see the module docstring)."""
    if size < 1:
        raise ValueError(f"the mosaic grid needs at least 1 cell a side, got {size}")
    x0, y0, x1, y1 = tile_map.bounds
    side = max(x1 - x0, y1 - y0, 1e-12) * 1.02
    origin = ((x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2)
    g = int(size)
    empty = MosaicGrid(origin, side, g, np.zeros(0, np.int64), *_blank(g))
    if not len(tile_map):
        return empty
    row, col = empty.cell_of(tile_map.xy)
    cell = row * g + col
    counts = np.bincount(cell, minlength=g * g).reshape(g, g)
    step = side / g
    cx = origin[0] + (col + 0.5) * step
    cy = origin[1] + (row + 0.5) * step
    d = (tile_map.xy[:, 0] - cx) ** 2 + (tile_map.xy[:, 1] - cy) ** 2
    order = np.lexsort((np.arange(len(cell)), d, cell))  # by cell, then distance, then index
    first = order[np.r_[True, cell[order][1:] != cell[order][:-1]]]
    chosen = np.full(g * g, -1, np.int64)
    chosen[cell[first]] = first
    k = int(tile_map.labels.max()) + 1 if len(tile_map.labels) else 0
    cluster = np.full(g * g, -1, np.int16)
    lab = tile_map.labels.astype(np.int64)
    ok = lab >= 0
    if k and ok.any():
        votes = np.zeros((g * g, k), np.int64)
        np.add.at(votes, (cell[ok], lab[ok]), 1)
        occupied = votes.sum(1) > 0
        cluster[occupied] = np.argmax(votes[occupied], axis=1)
    return MosaicGrid(origin, side, g, cell, counts, chosen.reshape(g, g), cluster.reshape(g, g))


def _blank(g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.zeros((g, g), np.int64),
        np.full((g, g), -1, np.int64),
        np.full((g, g), -1, np.int16),
    )


def read_thumbnails(
    store: FeatureStore,
    tile_map: TileMap,
    grid: MosaicGrid,
    cell_px: int = 32,
    *,
    slides: SlideCache | None = None,
    progress: Progress = no_progress,
) -> tuple[dict[int, np.ndarray], list[str]]:
    """({flat cell: (cell_px, cell_px, 3) uint8 thumbnail of its chosen tile}, warnings).

    Tiles are read slide by slide (each slide opened once) at the store's tiling; a slide that
    cannot be read leaves its cells grey and one warning. Progress stage ``mosaic`` (tiles read).
    """
    tiling = store.tiling
    cells = np.flatnonzero(grid.chosen.ravel() >= 0)
    tiles = grid.chosen.ravel()[cells]
    order = np.lexsort((tile_map.cols[tiles], tile_map.rows[tiles], tile_map.slide[tiles]))
    out: dict[int, np.ndarray] = {}
    warnings: list[str] = []
    grey = np.full((cell_px, cell_px, 3), _GREY, np.uint8)
    cache = slides if slides is not None else SlideCache(capacity=4)
    bad: set[str] = set()
    report = Throttle(progress)
    report("mosaic", 0, len(cells))
    try:
        for n, j in enumerate(order, 1):
            sid, r, c = tile_map.tile(int(tiles[j]))
            thumb = grey
            if sid not in bad:
                sf = store.slide(sid)
                try:
                    slide = cache.get(sf.source_path, mpp=tuple(sf.attrs["mpp"]))
                    x, y = (int(v) for v in sf.origins[r, c])
                    tile = slide.read_tile_at_mpp((x, y), tiling.target_mpp, tiling.tile_px)
                    thumb = np.asarray(
                        Image.fromarray(tile).resize((cell_px, cell_px), Image.Resampling.BOX)
                    )
                except (SlideError, OSError) as e:
                    bad.add(sid)
                    cache.forget(sf.source_path)
                    warnings.append(f"{one_line(e)} (map cells of slide {sid!r} left grey)")
            out[int(cells[j])] = thumb
            report("mosaic", n, len(cells))
    finally:
        if slides is None:
            cache.close()
    return out, warnings


def mosaic_image(
    grid: MosaicGrid, thumbnails: dict[int, np.ndarray], cell_px: int = 32
) -> np.ndarray:
    """(G * cell_px, G * cell_px, 3) uint8: each cell's thumbnail in place, white where empty."""
    g = grid.size
    img = np.full((g, cell_px, g, cell_px, 3), _EMPTY, np.uint8)
    for cell, thumb in thumbnails.items():
        r, c = divmod(int(cell), g)
        img[r, :, c, :] = thumb
    return img.reshape(g * cell_px, g * cell_px, 3)


def cluster_overlay(
    image: np.ndarray,
    grid: MosaicGrid,
    colors: np.ndarray,
    alpha: float = 0.35,
    border: Callable[[int], int] | None = None,
) -> np.ndarray:
    """The mosaic tinted by each cell's majority cluster (``colors`` (k, 3) uint8); empty cells untouched.

    Each occupied cell also gets a frame in its cluster's full colour, ``border(cell_px)`` px wide
    (default cell_px // 16, at least 1).
    """
    g = grid.size
    cell_px = image.shape[0] // g
    width = max(1, (border or (lambda p: p // 16))(cell_px))
    lab = np.repeat(np.repeat(grid.cluster, cell_px, 0), cell_px, 1)
    inside = lab >= 0
    tint = np.asarray(colors, np.float32)[np.clip(lab, 0, len(colors) - 1)]
    out = image.astype(np.float32)
    out[inside] = (1 - alpha) * out[inside] + alpha * tint[inside]
    edge = np.zeros((cell_px, cell_px), bool)
    edge[:width], edge[-width:], edge[:, :width], edge[:, -width:] = True, True, True, True
    frame = np.tile(edge, (g, g)) & inside
    out[frame] = tint[frame]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
