"""The map of a cluster run as the widget shows it (no Qt; run in a worker).

``engine.embed.run`` makes (or reuses) the run's 2-D map and its mosaic PNG; this module reads
them into a :class:`MapView`: the mosaic image, the grid that places map points on it
(``engine.tile_mosaic.MosaicGrid``, image pixels (row, col) <-> map (x, y)), and every tile as a
point in image pixels. Lookups are ``engine.tile_map.TileMap``'s; lasso is ``engine.lasso``'s.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine import embed
from engine.curation import Curation
from engine.lasso import apply_lasso
from engine.progress import Progress, no_progress
from engine.store import FeatureStore
from engine.tile_map import TileMap
from engine.tile_mosaic import MosaicGrid, mosaic_grid

GRID = 64
CELL_PX = 32
STAGES = {
    "map sample": "map: sampling tiles",
    "map fit": "map: fitting the embedding",
    "map transform": "map: placing tiles",
}


def default_method() -> str:
    """``umap`` when umap-learn is installed, else ``pca``."""
    return "umap" if importlib.util.find_spec("umap") is not None else "pca"


@dataclass
class MapView:
    """A run's map: mosaic (H, W, 3) uint8, its grid, the tiles, their points (N, 2) image px."""

    store_path: Path
    run: str
    method: str
    mosaic: np.ndarray
    grid: MosaicGrid
    tile_map: TileMap
    points: np.ndarray  # (N, 2) float64 image (row, col) of every tile
    cell_px: int = CELL_PX

    def tile_at(self, pixel_rc: tuple[float, float]) -> tuple[str, int, int] | None:
        """(slide id, row, col) of the tile nearest an image pixel of the mosaic (None: no tile
        within a cell's width)."""
        x, y = self.grid.to_map(np.asarray([pixel_rc], np.float64), self.cell_px)[0]
        i = self.tile_map.nearest(float(x), float(y), max_distance=self.grid.side / self.grid.size)
        return None if i is None else self.tile_map.tile(i)

    def lasso(self, curation: Curation, polygon_rc: np.ndarray, name: str | None) -> int:
        """Override the class of the tiles inside a polygon drawn on the mosaic (image (row, col))."""
        polygon = self.grid.to_map(np.asarray(polygon_rc, np.float64)[:, -2:], self.cell_px)
        return apply_lasso(curation, self.tile_map, polygon, name)


def make_map(
    store_path: Path, run: str, method: str | None = None, *, progress: Progress = no_progress
) -> MapView:
    """The run's map (``engine.embed``: made, resumed or reused) with its mosaic."""
    method = method or default_method()
    cfg = embed.EmbedConfig(
        store=Path(store_path), run=run, method=method, grid=GRID, cell_px=CELL_PX, quiet=True
    )
    result = embed.run(cfg, progress=lambda s, d, t: progress(f"map {s}", d, t))
    store = FeatureStore.open(store_path)
    tile_map = result.tile_map
    grid = mosaic_grid(tile_map, GRID)
    png = store.run_file(run, embed.MOSAIC_FILE)
    if png is not None and png.is_file():
        mosaic = np.asarray(Image.open(png).convert("RGB"))
    else:
        mosaic = np.full((GRID * CELL_PX, GRID * CELL_PX, 3), 255, np.uint8)
    points = grid.to_pixels(tile_map.xy, CELL_PX)
    return MapView(Path(store_path), run, method, mosaic, grid, tile_map, points)
