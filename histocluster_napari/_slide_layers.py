"""Whole-slide images as lazy multiscale RGB napari layers in micrometres.

A slide becomes a list of dask arrays, one per pyramid level, whose chunks are whole multiples of
the slide's own tiles; every chunk is one ``Slide.read_region`` call, so nothing ever reads a
whole level. The layer's scale is the level-0 micrometres per pixel, so the scale bar is right and
slides scanned at different resolutions overlay.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from napari.utils.notifications import show_warning
from PIL import Image

from engine.errors import HistoclusterError, MissingMppError
from engine.slide import Slide, open_slide

LayerData = tuple[Any, dict[str, Any], str]
"""A napari LayerDataTuple: (data, kwargs, layer type)."""

METADATA_KEY = "histocluster"
"""Key of the layer metadata dict the widget reads: slide path, mpp, whether the mpp is known."""

CHUNK_TARGET_PX = 512
"""Chunks are the multiple of the slide's tile side nearest this (fewer, larger dask tasks)."""
DEFAULT_TILE_PX = 256
"""Tile side assumed for slides that do not declare one (plain images)."""
MAX_COARSEST_PX = 4096
"""Levels are added by factor 2 below the slide's own until the coarsest fits this."""
OVERVIEW_PX = 1024
"""The coarsest level shown is held in memory, at most this many pixels on its longer side."""
PLACEHOLDER_MPP = 1.0
"""Scale shown for slides without resolution metadata until the user enters it in the widget."""


def open_for_viewing(path: str | Path, mpp: float | None = None) -> tuple[Slide | None, bool]:
    """Open ``path`` for display: (slide, mpp known?); (None, False) when it is not readable.

    A slide without resolution metadata opens at ``PLACEHOLDER_MPP`` with ``mpp known`` False,
    so it can be viewed while the widget asks for its micrometres per pixel.
    """
    try:
        return open_slide(path, mpp), True
    except MissingMppError:
        try:
            return open_slide(path, PLACEHOLDER_MPP), False
        except (HistoclusterError, OSError, ValueError):
            return None, False
    except (HistoclusterError, OSError, ValueError):
        return None, False


def slide_layer_data(
    slide: Slide, mpp_known: bool = True, name: str | None = None, pyramid: list | None = None
) -> LayerData:
    """A napari image LayerDataTuple: multiscale RGB pyramid of ``slide`` with scale in um.

    ``pyramid``: the levels to show (default: :func:`slide_pyramid`, read lazily).
    """
    mx, my = slide.mpp
    meta = {
        "slide_path": str(slide.path),
        "mpp": (mx, my),
        "mpp_known": mpp_known,
    }
    kwargs: dict[str, Any] = {
        "name": name or slide.path.stem,
        "multiscale": True,
        "rgb": True,
        "contrast_limits": (0, 255),
        "scale": (my, mx),
        "units": ("um", "um") if mpp_known else ("pixel", "pixel"),
        "metadata": {METADATA_KEY: meta},
    }
    if not mpp_known:
        show_warning(
            f"{slide.path}: no resolution (microns per pixel) in the metadata — enter the slide's "
            "um/px in the HistoCluster widget (shown in pixels until then)"
        )
    return (slide_pyramid(slide) if pyramid is None else pyramid), kwargs, "image"


def slide_tile_size(slide: Slide, level: int) -> tuple[int, int]:
    """(w, h) of the slide's own tiles at ``level`` (``DEFAULT_TILE_PX`` when not declared)."""
    props = getattr(slide, "properties", {}) or {}
    try:
        w = int(props[f"openslide.level[{level}].tile-width"])
        h = int(props[f"openslide.level[{level}].tile-height"])
        if w > 0 and h > 0:
            return w, h
    except (KeyError, ValueError):
        pass
    return DEFAULT_TILE_PX, DEFAULT_TILE_PX


def _chunk(tile: int) -> int:
    return tile * max(1, round(CHUNK_TARGET_PX / tile))


UNREADABLE_GREY = 128
"""What the viewer shows where a slide's pixels cannot be read."""


class LevelArray:
    """Array-like (h, w, 3) uint8 view of one pyramid level; indexing reads just that region.

    ``extra_downsample`` > 1 makes a synthetic level: regions of ``level`` that many times larger
    are read and shrunk, for slides whose own coarsest level is too big to show whole.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, slide: Slide, level: int, extra_downsample: int = 1) -> None:
        self.slide, self.level, self.extra = slide, level, int(extra_downsample)
        w, h = slide.level_dimensions[level]
        self.shape = (math.ceil(h / self.extra), math.ceil(w / self.extra), 3)
        self.downsample = slide.level_downsamples[level]

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = (k if isinstance(k, slice) else slice(k, k + 1) for k in key)
        y0, y1, ystep = ys.indices(self.shape[0])
        x0, x1, xstep = xs.indices(self.shape[1])
        if ystep != 1 or xstep != 1:
            raise IndexError("LevelArray supports unit-step slices only")
        if y1 <= y0 or x1 <= x0:
            return np.empty((max(0, y1 - y0), max(0, x1 - x0), 3), np.uint8)[..., cs]
        e = self.extra
        l0_xy = (round(x0 * e * self.downsample), round(y0 * e * self.downsample))
        size = ((x1 - x0) * e, (y1 - y0) * e)
        try:
            region = self.slide.read_region(l0_xy, self.level, size)
        except HistoclusterError:
            region = self._salvage(l0_xy, size)
        if e > 1:
            region = np.asarray(
                Image.fromarray(region).reduce(e) if region.shape[0] >= e else region[::e, ::e]
            )[: y1 - y0, : x1 - x0]
        return region[..., cs]

    def _salvage(self, l0_xy: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 of a region with unreadable parts: the slide is reopened (OpenSlide
        errors latch) and read in pieces of its own tiles; pieces that fail stay grey."""
        try:
            self.slide = open_slide(self.slide.path, getattr(self.slide, "mpp", None))
        except HistoclusterError:
            return np.full((size[1], size[0], 3), UNREADABLE_GREY, np.uint8)
        w, h = size
        out = np.full((h, w, 3), UNREADABLE_GREY, np.uint8)
        tw, th = slide_tile_size(self.slide, self.level)
        ds = self.downsample
        for py in range(0, h, th):
            for px in range(0, w, tw):
                pw, ph = min(tw, w - px), min(th, h - py)
                xy = (l0_xy[0] + round(px * ds), l0_xy[1] + round(py * ds))
                try:
                    out[py : py + ph, px : px + pw] = self.slide.read_region(
                        xy, self.level, (pw, ph)
                    )
                except HistoclusterError:
                    self.slide = open_slide(self.slide.path, getattr(self.slide, "mpp", None))
        return out


def level_arrays(slide: Slide) -> list[tuple[LevelArray, tuple[int, int]]]:
    """Finest first: each level's region reader and its chunk (h, w), whole slide tiles.

    The slide's own levels, then synthetic ones (factor 2 each) below the coarsest until one
    fits ``MAX_COARSEST_PX``.
    """
    out = []
    for level in range(slide.level_count):
        tw, th = slide_tile_size(slide, level)
        out.append((LevelArray(slide, level), (_chunk(th), _chunk(tw))))
    coarsest = slide.level_count - 1
    tw, th = slide_tile_size(slide, coarsest)
    extra = 2
    while max(out[-1][0].shape[:2]) > MAX_COARSEST_PX:
        out.append((LevelArray(slide, coarsest, extra), (_chunk(th), _chunk(tw))))
        extra *= 2
    return out


def slide_pyramid(slide: Slide) -> list[da.Array]:
    """Finest-first dask arrays (h, w, 3) uint8 of every level, chunked on the slide's tiles."""
    meta = np.empty((0, 0, 0), np.uint8)
    return [
        da.from_array(
            arr,
            chunks=(*chunk, 3),
            meta=meta,
            asarray=False,
            fancy=False,
            lock=False,
            name=f"histocluster-{slide.path.name}-{id(slide)}-{arr.level}x{arr.extra}",
        )
        for arr, chunk in level_arrays(slide)
    ]


def overview(arr: LevelArray) -> np.ndarray:
    """(h, w, 3) uint8 of the whole level ``arr`` (read here: a worker's job, not the GUI's),
    shrunk by the power of two that fits ``OVERVIEW_PX``."""
    h, w = arr.shape[:2]
    factor = 1
    while max(math.ceil(h / factor), math.ceil(w / factor)) > OVERVIEW_PX:
        factor *= 2
    whole = np.asarray(arr[:, :])
    if factor > 1:
        whole = np.asarray(Image.fromarray(whole).reduce(factor))
    return np.ascontiguousarray(whole)
