"""Tile outlines (the gallery tile, a similar-tiles query and its hits) as a multiscale label image.

The outlines are drawn by a Labels layer, the kind of layer the clusters already use, not by a
Points layer of square markers: vispy's markers fragment shader (14 KB, every symbol) took Mesa's
llvmpipe 600-700 ms to compile and link on the GUI thread at its first draw (cold shader cache),
and its first draw with the slide's transform another 200 ms; a second Labels layer reuses the
clusters' shader. Only the bounding box of the outlined tiles is drawn, ``sub`` label pixels per
grid step at level ``i`` (``OUTLINE_SUBS``), the outline one label pixel wide: at level 0 a
twelfth of the tile's side, and at the coarsest a whole tile filled, so an outline stays visible
when the slide is zoomed out (napari draws the level that matches the zoom).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from histocluster_napari._overlay import TRANSPARENT, GridGeometry, hatch_placement

OUTLINE_SUBS = (12, 6, 3, 1)
"""Label pixels per grid step of each level; the outline is one pixel of level 0 wide (1/12)."""
QUERY, HIT, MARK = 1, 2, 3
"""Label values: the tile a similar-tiles query was made from, its hits, the gallery tile."""
OUTLINE_RGBA = {QUERY: (0.0, 1.0, 1.0, 1.0), HIT: (1.0, 1.0, 0.0, 1.0), MARK: (1.0, 0.0, 1.0, 1.0)}
"""Cyan, yellow, magenta."""


def blank_outline_levels() -> list[np.ndarray]:
    """The levels of a layer with no outline: one tile's, all 0."""
    return [np.zeros((sub, sub), np.uint8) for sub in OUTLINE_SUBS]


def outline_levels(
    tiles: Sequence[tuple[int, int]], values: Sequence[int], subs: Sequence[int] = OUTLINE_SUBS
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Levels ``(h * sub, w * sub)`` uint8 over the bounding box (h, w tiles) of ``tiles``
    (row, col), each tile's one-pixel border set to its value (a tile of ``sub <= 2`` filled),
    and the box's first (row, col). A tile listed twice keeps its last value."""
    if len(tiles) != len(values):
        raise ValueError(f"{len(tiles)} tiles but {len(values)} outline values")
    if not tiles:
        return blank_outline_levels(), (0, 0)
    rc = np.asarray(tiles, np.int64).reshape(-1, 2)
    r0, c0 = rc.min(axis=0)
    h, w = rc.max(axis=0) - (r0, c0) + 1
    levels = []
    for sub in subs:
        level = np.zeros((h * sub, w * sub), np.uint8)
        for (r, c), value in zip(rc - (r0, c0), values, strict=True):
            y, x = r * sub, c * sub
            level[y : y + sub, x : x + sub] = value
            if sub > 2:
                level[y + 1 : y + sub - 1, x + 1 : x + sub - 1] = 0
        levels.append(level)
    return levels, (int(r0), int(c0))


def outline_placement(
    geom: GridGeometry, origin: tuple[int, int], sub: int = OUTLINE_SUBS[0]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of level 0 of :func:`outline_levels` boxed at ``origin`` (row, col):
    the placement of a hatching of ``sub`` label pixels per grid step (``hatch_placement``),
    moved to tile ``origin``."""
    scale, (ty, tx) = hatch_placement(geom, sub)
    (sy, sx) = geom.scale
    return scale, (ty + origin[0] * sy, tx + origin[1] * sx)


def outline_colormap() -> DirectLabelColormap:
    color_dict = {None: TRANSPARENT, 0: TRANSPARENT}
    color_dict.update({v: np.asarray(c, np.float32) for v, c in OUTLINE_RGBA.items()})
    return DirectLabelColormap(color_dict=color_dict, background_value=0)
