"""One tile of a feature store, named in the frames the design uses: its slide, its grid
``row, col`` and its level-0 origin ``l0_x, l0_y`` (see the Coordinates section of the design).

The records that point at tiles (cluster exemplars, query hits, planned export files) extend it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TileRef"]


@dataclass(frozen=True, slots=True)
class TileRef:
    """A tile: ``slide_id``, grid ``row``/``col``, level-0 pixel origin ``l0_x``/``l0_y``."""

    slide_id: str
    row: int
    col: int
    l0_x: int
    l0_y: int
