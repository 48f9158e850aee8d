"""What a tile reader needs to read one slide's tiles, and the ways tiles can be read.

Light on purpose (numpy only, no torch): the extraction plan is made before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["READERS", "SlideJob"]

READERS = ("auto", "jpeg", "openslide", "device")
"""How tiles are read: see :class:`engine.tile_reader.TileSources`."""


@dataclass(frozen=True)
class SlideJob:
    """What a reader needs to read one slide's tiles: file, mpp used and the grid's origins."""

    slide_id: str
    path: str
    mpp: tuple[float, float]
    target_mpp: float
    tile_px: int
    xs: np.ndarray  # (cols,) int64 level-0 x of each grid column
    ys: np.ndarray  # (rows,) int64 level-0 y of each grid row
    reader: str = "openslide"  # one of READERS
