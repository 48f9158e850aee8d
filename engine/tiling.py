"""The tile grid of a slide, defined in physical units.

A tile is ``tile_px`` pixels at ``target_mpp`` micrometres per pixel, so slides scanned at
0.25 and 0.5 um/px give tiles of the same physical size. Tiles step by ``stride_px`` (in
target-mpp pixels, default ``tile_px``) from the level-0 origin (0, 0) and cover the whole
slide: edge tiles may reach past its border, where they read white and count as background.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from engine.slide import Slide
from engine.tissue import TissueMethod, tissue_mask, tissue_mask_of_strips

# Mask pixels along a tile side when measuring tissue fractions, and bounds of the thumbnail.
MASK_PX_PER_TILE = 16
MIN_THUMBNAIL_PX = 1024
MAX_THUMBNAIL_PX = 8192


@dataclass(frozen=True)
class Tiling:
    """How a slide is cut into tiles: what a feature store's tiles have in common.

    Attributes:
        tile_px: tile side in pixels at ``target_mpp``.
        target_mpp: micrometres per pixel of the tiles.
        stride_px: step between tiles in pixels at ``target_mpp`` (None: ``tile_px``).
        tissue_method: "otsu" or "hsv" (see ``engine.tissue``).
        min_tissue: a tile is selected for encoding when its tissue fraction is at least this.
    """

    tile_px: int = 224
    target_mpp: float = 0.5
    stride_px: int | None = None
    tissue_method: TissueMethod = "otsu"
    min_tissue: float = 0.5

    def __post_init__(self) -> None:
        if self.stride_px is None:
            object.__setattr__(self, "stride_px", int(self.tile_px))

    @property
    def stride(self) -> int:
        """The resolved stride in pixels at ``target_mpp``."""
        return int(self.stride_px or self.tile_px)

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready attributes (the store's ``tiling`` attrs)."""
        return {
            "tile_px": int(self.tile_px),
            "stride_px": self.stride,
            "target_mpp": float(self.target_mpp),
            "tissue_method": str(self.tissue_method),
            "min_tissue": float(self.min_tissue),
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Tiling:
        """Inverse of :meth:`to_attrs`."""
        return cls(
            tile_px=int(attrs["tile_px"]),
            target_mpp=float(attrs["target_mpp"]),
            stride_px=int(attrs.get("stride_px") or attrs["tile_px"]),
            tissue_method=attrs.get("tissue_method", "otsu"),
            min_tissue=float(attrs.get("min_tissue", 0.5)),
        )

    def differences(self, other: Tiling) -> list[str]:
        """``name=mine vs theirs`` for every attribute that differs (floats to 1e-9 relative)."""
        a, b = self.to_attrs(), other.to_attrs()
        out = []
        for k in a:
            x, y = a[k], b[k]
            same = math.isclose(x, y, rel_tol=1e-9) if isinstance(x, float) else x == y
            if not same:
                out.append(f"{k}={x!r} vs {y!r}")
        return out


class TileGrid:
    """Rows x cols of tiles over ``slide``; origins in level-0 pixels, tissue fraction per tile.

    Args:
        slide: an open ``Slide``.
        target_mpp: micrometres per pixel of the tiles.
        tile_px: tile side in pixels at ``target_mpp``.
        stride_px: step between tiles in pixels at ``target_mpp`` (default: ``tile_px``).
        min_tissue: a tile is selected for encoding when its tissue fraction is at least this.
        tissue_method: "otsu" or "hsv" (see ``engine.tissue``).
    """

    def __init__(
        self,
        slide: Slide,
        target_mpp: float = 0.5,
        tile_px: int = 224,
        stride_px: int | None = None,
        min_tissue: float = 0.5,
        tissue_method: TissueMethod = "otsu",
    ) -> None:
        if target_mpp <= 0 or tile_px <= 0 or (stride_px is not None and stride_px <= 0):
            raise ValueError("target_mpp, tile_px and stride_px must be positive")
        if not 0.0 <= min_tissue <= 1.0:
            raise ValueError(f"min_tissue must lie in [0, 1], got {min_tissue}")
        self.slide = slide
        self.target_mpp = float(target_mpp)
        self.tile_px = int(tile_px)
        self.stride_px = int(stride_px if stride_px is not None else tile_px)
        self.min_tissue = float(min_tissue)
        self.tissue_method: TissueMethod = tissue_method
        self.level = slide.best_level_for_mpp(self.target_mpp)
        self.read_size = slide.read_size_at_mpp(self.level, self.target_mpp, self.tile_px)
        mx, my = slide.mpp
        self.tile_l0_xy = (self.tile_px * self.target_mpp / mx, self.tile_px * self.target_mpp / my)
        self.stride_l0_xy = (
            self.stride_px * self.target_mpp / mx,
            self.stride_px * self.target_mpp / my,
        )
        w, h = slide.dimensions
        self.cols = _count(w, self.tile_l0_xy[0], self.stride_l0_xy[0])
        self.rows = _count(h, self.tile_l0_xy[1], self.stride_l0_xy[1])

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols)."""
        return self.rows, self.cols

    @property
    def tile_l0(self) -> float:
        """Tile side in level-0 pixels (x)."""
        return self.tile_l0_xy[0]

    @property
    def stride_l0(self) -> float:
        """Step between tiles in level-0 pixels (x)."""
        return self.stride_l0_xy[0]

    @cached_property
    def origins(self) -> np.ndarray:
        """(rows, cols, 2) int64: level-0 (l0_x, l0_y) of every tile's top-left corner."""
        xs = np.round(np.arange(self.cols) * self.stride_l0_xy[0]).astype(np.int64)
        ys = np.round(np.arange(self.rows) * self.stride_l0_xy[1]).astype(np.int64)
        out = np.empty((self.rows, self.cols, 2), dtype=np.int64)
        out[..., 0] = xs[None, :]
        out[..., 1] = ys[:, None]
        return out

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 (l0_x, l0_y) of tile (row, col)."""
        x, y = self.origins[row, col]
        return int(x), int(y)

    @property
    def thumbnail_px(self) -> int:
        """Longest side of the thumbnail the tissue mask is computed on (MASK_PX_PER_TILE per tile)."""
        w, h = self.slide.dimensions
        tiles_long = max(w / self.stride_l0_xy[0], h / self.stride_l0_xy[1])
        max_px = int(np.clip(tiles_long * MASK_PX_PER_TILE, MIN_THUMBNAIL_PX, MAX_THUMBNAIL_PX))
        return min(max_px, max(w, h))

    @cached_property
    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 thumbnail the tissue mask is computed on (MASK_PX_PER_TILE per tile)."""
        return self.slide.thumbnail(self.thumbnail_px)

    @cached_property
    def tissue_mask(self) -> np.ndarray:
        """(h, w) bool tissue mask at thumbnail scale.

        Computed from the thumbnail strip by strip (``Slide.thumbnail_strips``,
        ``tissue_mask_of_strips``): the same mask as ``tissue_mask(self.thumbnail)``, with memory
        bounded by the slide's thumbnail level and 2 bytes per mask pixel, not a few copies of the
        thumbnail at 3-12 bytes per pixel.
        """
        if "thumbnail" in self.__dict__:  # already in memory
            return tissue_mask(self.thumbnail, self.tissue_method)
        strips = self.slide.thumbnail_strips(self.thumbnail_px)
        return tissue_mask_of_strips(strips, self.tissue_method)

    @cached_property
    def tissue(self) -> np.ndarray:
        """(rows, cols) float32: share of each tile's area that is tissue (outside the slide counts as none)."""
        return tile_fractions(
            self.tissue_mask, self.slide.dimensions, self.origins, self.tile_l0_xy
        )

    @property
    def selected(self) -> np.ndarray:
        """(rows, cols) bool: tiles to encode (tissue fraction >= min_tissue)."""
        return self.tissue >= self.min_tissue

    def read_tile(self, row: int, col: int) -> np.ndarray:
        """(tile_px, tile_px, 3) uint8 RGB of tile (row, col)."""
        return self.slide.read_tile_at_mpp(self.origin(row, col), self.target_mpp, self.tile_px)

    @classmethod
    def from_tiling(cls, slide: Slide, tiling: Tiling) -> TileGrid:
        """The grid of ``slide`` cut as ``tiling`` says."""
        return cls(
            slide,
            tiling.target_mpp,
            tiling.tile_px,
            tiling.stride,
            tiling.min_tissue,
            tiling.tissue_method,
        )

    @property
    def tiling(self) -> Tiling:
        """The grid's parameters, as stored next to features."""
        return Tiling(
            self.tile_px, self.target_mpp, self.stride_px, self.tissue_method, self.min_tissue
        )


def _count(extent: int, tile: float, stride: float) -> int:
    """Tiles needed to cover ``extent`` pixels with tiles of ``tile`` stepping by ``stride``."""
    if extent <= tile:
        return 1
    return int(math.ceil((extent - tile) / stride - 1e-9)) + 1


def tile_fractions(
    mask: np.ndarray,
    l0_dimensions: tuple[int, int],
    origins: np.ndarray,
    tile_l0_xy: tuple[float, float],
) -> np.ndarray:
    """Share of each tile covered by ``mask``.

    Args:
        mask: (h, w) bool, covering the level-0 extent ``l0_dimensions`` = (W, H).
        origins: (rows, cols, 2) level-0 (x, y) of the tiles.
        tile_l0_xy: tile size in level-0 pixels.
    Returns:
        (rows, cols) float32 in [0, 1]; area outside the mask's extent counts as not covered.
    """
    h, w = mask.shape
    sx, sy = w / l0_dimensions[0], h / l0_dimensions[1]
    x0 = np.round(origins[..., 0] * sx).astype(np.int64)
    y0 = np.round(origins[..., 1] * sy).astype(np.int64)
    x1 = np.round((origins[..., 0] + tile_l0_xy[0]) * sx).astype(np.int64)
    y1 = np.round((origins[..., 1] + tile_l0_xy[1]) * sy).astype(np.int64)
    x1, y1 = np.maximum(x1, x0 + 1), np.maximum(y1, y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cx1 = np.clip(x0, 0, w), np.clip(x1, 0, w)
    cy0, cy1 = np.clip(y0, 0, h), np.clip(y1, 0, h)
    covered = np.zeros(area.shape, np.int64)
    for i in range(len(covered)):  # one tile row at a time: an integral image of its mask rows only
        lo, hi = int(cy0[i].min(initial=h)), int(cy1[i].max(initial=0))
        if hi <= lo:
            continue
        integral = np.zeros((hi - lo + 1, w + 1), dtype=np.int64)
        integral[1:, 1:] = np.cumsum(np.cumsum(mask[lo:hi], axis=0, dtype=np.int64), axis=1)
        top, bottom, left, right = cy0[i] - lo, cy1[i] - lo, cx0[i], cx1[i]
        covered[i] = (
            integral[bottom, right]
            - integral[top, right]
            - integral[bottom, left]
            + integral[top, left]
        )
    return (covered / area).astype(np.float32)
