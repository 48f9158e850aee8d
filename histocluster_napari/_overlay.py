"""Geometry and colours of the cluster overlay: a Labels layer with one pixel per tile (no Qt widgets).

napari puts the centre of pixel ``j`` of a layer at ``j * scale + translate``. The slide layer has
scale ``mpp`` and translate 0, so level-0 pixel ``j`` covers world ``[(j - 0.5), (j + 0.5)] * mpp``.
Tile ``c`` covers level-0 pixels ``[c * stride_l0, c * stride_l0 + tile_l0)``, i.e. world
``[(c * stride_l0 - 0.5) * mpp, (c * stride_l0 + tile_l0 - 0.5) * mpp]``. One label pixel per
tile, with scale ``stride_l0 * mpp`` and translate ``(tile_l0 / 2 - 0.5) * mpp``, puts the
centre of label pixel ``c`` on the tile's centre ``(c * stride_l0 + tile_l0 / 2 - 0.5) * mpp``;
when stride = tile (the default grid) the label pixel covers the tile's pixels exactly.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from napari.utils.colormaps import DirectLabelColormap

from engine.curation import Curation
from engine.mosaic import cluster_colors as rgb_colors

TRANSPARENT = np.zeros(4, np.float32)
EXCLUDED_RGBA = np.array([0.1, 0.1, 0.1, 0.85], np.float32)
"""Excluded tiles are drawn dark, over the slide (dimmed)."""
OVERRIDE_ONLY_RGBA = np.array([1.0, 1.0, 1.0, 0.9], np.float32)
"""Tiles moved to a class that names no cluster are drawn white."""


@dataclass(frozen=True)
class GridGeometry:
    """Where a slide's tile grid lies in level-0 pixels. All pairs are (x, y)."""

    mpp: tuple[float, float]
    tile_l0: tuple[float, float]
    stride_l0: tuple[float, float]
    rows: int
    cols: int

    @classmethod
    def from_grid(cls, grid: Any) -> GridGeometry:
        """From an ``engine.tiling.TileGrid``."""
        return cls(
            tuple(float(v) for v in grid.slide.mpp),  # type: ignore[arg-type]
            tuple(float(v) for v in grid.tile_l0_xy),  # type: ignore[arg-type]
            tuple(float(v) for v in grid.stride_l0_xy),  # type: ignore[arg-type]
            int(grid.rows),
            int(grid.cols),
        )

    @classmethod
    def from_store_attrs(cls, attrs: Mapping[str, Any]) -> GridGeometry:
        """From the attrs of a feature store's ``slides/<slide_id>`` group."""
        return cls(
            tuple(float(v) for v in attrs["mpp"]),  # type: ignore[arg-type]
            tuple(float(v) for v in attrs["tile_l0"]),  # type: ignore[arg-type]
            tuple(float(v) for v in attrs["stride_l0"]),  # type: ignore[arg-type]
            int(attrs["rows"]),
            int(attrs["cols"]),
        )

    @property
    def scale(self) -> tuple[float, float]:
        """(y, x) world size of one label pixel (one grid step) in micrometres."""
        return self.stride_l0[1] * self.mpp[1], self.stride_l0[0] * self.mpp[0]

    @property
    def translate(self) -> tuple[float, float]:
        """(y, x) world position of the centre of label pixel (0, 0): the centre of tile (0, 0)."""
        return (self.tile_l0[1] / 2 - 0.5) * self.mpp[1], (self.tile_l0[0] / 2 - 0.5) * self.mpp[0]

    def tile_at(
        self, world_yx: tuple[float, float], offset_yx: tuple[float, float] = (0.0, 0.0)
    ) -> tuple[int, int] | None:
        """(row, col) of the label pixel under a world point, or None outside the grid.

        ``offset_yx`` is the slide layer's own translate (0 unless the user moved it).
        """
        (sy, sx), (ty, tx) = self.scale, self.translate
        row = math.floor((world_yx[0] - offset_yx[0] - ty) / sy + 0.5)
        col = math.floor((world_yx[1] - offset_yx[1] - tx) / sx + 0.5)
        if 0 <= row < self.rows and 0 <= col < self.cols:
            return row, col
        return None

    def tile_bounds_l0(self, row: int, col: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) level-0 pixel edges covered by tile (row, col)."""
        x0, y0 = col * self.stride_l0[0], row * self.stride_l0[1]
        return x0, y0, x0 + self.tile_l0[0], y0 + self.tile_l0[1]


def cluster_colors(k: int) -> np.ndarray:
    """(k, 4) float32 RGBA in [0, 1]: ``engine.mosaic``'s palette, the one of every overlay PNG."""
    rgb = rgb_colors(k).astype(np.float32) / 255.0
    return np.concatenate([rgb, np.ones((k, 1), np.float32)], axis=1)


def labels_colormap(colors: np.ndarray, visible: Collection[int] | None = None) -> Any:
    """A napari ``DirectLabelColormap`` for label image ``cluster + 1`` (0 = no tissue).

    Clusters not in ``visible`` (all when None) and the background are transparent. With ``k =
    len(colors)``, value ``k + 1`` (an excluded tile) is dark and ``k + 2`` (a tile moved to a
    class that names no cluster) white: see :func:`curated_label_image`.
    """
    color_dict: dict[int | None, np.ndarray] = {None: TRANSPARENT, 0: TRANSPARENT}
    for i, c in enumerate(colors):
        shown = visible is None or i in visible
        color_dict[i + 1] = np.asarray(c, np.float32) if shown else TRANSPARENT
    color_dict[len(colors) + 1] = EXCLUDED_RGBA
    color_dict[len(colors) + 2] = OVERRIDE_ONLY_RGBA
    return DirectLabelColormap(color_dict=color_dict, background_value=0)


def curated_label_image(labels: np.ndarray, curation: Curation, slide_id: str) -> np.ndarray:
    """(rows, cols) uint8 (uint16 for k > 253) label image of a slide, per-tile overrides drawn in.

    ``cluster + 1`` for each tile (0 outside tissue); a tile moved to a class takes the value of
    the first cluster of that name (``k + 2`` when the class names no cluster); an excluded tile
    is ``k + 1``.
    """
    k = curation.k
    out = label_image(labels, k)
    first = {}
    for c, name in enumerate(curation.names):
        if name is not None:
            first.setdefault(name, c)
    for (_, r, c), name in curation.overrides(slide_id).items():
        if r < out.shape[0] and c < out.shape[1]:
            out[r, c] = k + 1 if name is None else first.get(name, k + 1) + 1
            if name is not None and name not in first:
                out[r, c] = k + 2
    return out


def label_image(labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """(rows, cols) cluster ids with -1 outside tissue -> (rows, cols) ``id + 1``, 0 outside.

    uint8 when the run's ``k`` (default: the largest id + 1) and the two correction values fit,
    else uint16: napari builds a labels layer's colour texture over every value of the data's
    dtype, in Python, for each new colormap (256 values for uint8, 65,536 for uint16: about
    0.4 s on the GUI thread).
    """
    ids = (np.asarray(labels).astype(np.int32) + 1).clip(0)
    top = int(k) if k is not None else int(ids.max(initial=0))
    return ids.astype(np.uint8 if top + 2 <= 255 else np.uint16)


HATCH_SUB = 8
"""Label pixels per tile side in the hatching of unreadable tiles."""
HATCH_RGBA = np.array([1.0, 0.15, 0.15, 1.0], np.float32)


def hatch_image(failed: np.ndarray, sub: int = HATCH_SUB) -> np.ndarray:
    """(rows * sub, cols * sub) uint8: diagonal stripes (1) over each failed tile, 0 elsewhere."""
    failed = np.asarray(failed, bool)
    j = np.arange(sub)
    stripes = ((j[:, None] + j[None, :]) % 4 == 0).astype(np.uint8)  # (sub, sub)
    return np.kron(failed.astype(np.uint8), stripes)


def hatch_placement(geom: GridGeometry, sub: int = HATCH_SUB) -> tuple[tuple, tuple]:
    """(scale, translate) of :func:`hatch_image`: ``sub`` x ``sub`` label pixels per grid step,
    the first one's centre ``scale / 2`` in from the tile's top-left edge."""
    (sy, sx), (ty, tx) = geom.scale, geom.translate
    scale = (sy / sub, sx / sub)
    return scale, (ty - sy / 2 + scale[0] / 2, tx - sx / 2 + scale[1] / 2)


def hatch_colormap() -> Any:
    return DirectLabelColormap(
        color_dict={None: TRANSPARENT, 0: TRANSPARENT, 1: HATCH_RGBA}, background_value=0
    )
