"""TileGrid on grids small enough to check by hand, and on the real CMU slide."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.slide import ArraySlide, open_slide
from engine.tiling import TileGrid, tile_fractions


def _slide(
    width: int, height: int, mpp: float = 0.5, tissue: tuple[slice, slice] | None = None
) -> ArraySlide:
    rgb = np.full((height, width, 3), 250, np.uint8)
    if tissue is not None:
        rgb[tissue] = (180, 60, 140)  # saturated pink
    return ArraySlide(rgb, mpp)


def test_grid_shape_and_origins_with_edge_tiles() -> None:
    grid = TileGrid(_slide(100, 70), target_mpp=0.5, tile_px=32, min_tissue=0.5)
    assert grid.shape == (3, 4)  # ceil(70/32), ceil(100/32): edge tiles reach past the border
    assert grid.origins[0, 0].tolist() == [0, 0]
    assert grid.origins[2, 3].tolist() == [96, 64]
    assert grid.tile_l0 == 32 and grid.level == 0 and grid.read_size == (32, 32)


def test_stride_overlaps_tiles() -> None:
    grid = TileGrid(_slide(100, 64), target_mpp=0.5, tile_px=32, stride_px=16)
    # x: tiles at 0,16,...,80 (80+32 >= 100 -> 6 tiles); y: 0,16,32 (32+32 >= 64 -> 3 tiles)
    assert grid.shape == (3, 6)
    assert grid.origins[1, 5].tolist() == [80, 16]


def test_physical_units_scale_the_grid() -> None:
    # 0.25 um/px slide, tiles of 32 px at 0.5 um/px cover 64 level-0 pixels
    grid = TileGrid(_slide(256, 128, mpp=0.25), target_mpp=0.5, tile_px=32)
    assert grid.tile_l0 == 64 and grid.shape == (2, 4)
    assert grid.read_size == (64, 64)  # level 0 read, resized to 32
    assert grid.read_tile(0, 0).shape == (32, 32, 3)


def test_tissue_fraction_per_tile_by_hand() -> None:
    # 64x64 slide, tiles of 32: tissue fills the left half of the top-left tile and all of the
    # bottom-right tile
    slide_ = _slide(64, 64)
    rgb = np.full((64, 64, 3), 250, np.uint8)
    rgb[0:32, 0:16] = (180, 60, 140)
    rgb[32:64, 32:64] = (180, 60, 140)
    slide_ = ArraySlide(rgb, 0.5)
    grid = TileGrid(slide_, target_mpp=0.5, tile_px=32, min_tissue=0.5)
    assert grid.tissue == pytest.approx(np.array([[0.5, 0.0], [0.0, 1.0]]), abs=0.05)
    assert grid.selected.tolist() == [[True, False], [False, True]]


def test_area_outside_slide_counts_as_background() -> None:
    mask = np.ones((10, 10), bool)
    origins = np.array([[[0, 0], [5, 0]]])
    fractions = tile_fractions(mask, (10, 10), origins, (10.0, 10.0))
    assert fractions.tolist() == [[1.0, 0.5]]


def test_min_tissue_threshold() -> None:
    grid = TileGrid(
        _slide(64, 32, tissue=(slice(0, 32), slice(0, 24))),
        target_mpp=0.5,
        tile_px=32,
        min_tissue=0.7,
    )
    assert grid.tissue[0, 0] == pytest.approx(0.75, abs=0.05)
    assert grid.selected.tolist() == [[True, False]]


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        TileGrid(_slide(10, 10), tile_px=0)
    with pytest.raises(ValueError):
        TileGrid(_slide(10, 10), min_tissue=1.5)


def test_cmu_grid_finds_the_tissue(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        grid = TileGrid(slide, target_mpp=0.5, tile_px=224)
        assert grid.shape == (14, 10)
        assert 30 <= grid.selected.sum() <= 80
        # the tissue runs down the middle of this slide; the left and right edges are glass
        assert grid.tissue[:, 0].max() < 0.1 and grid.tissue[:, -1].max() < 0.1
        tile = grid.read_tile(5, 5)
        assert tile.shape == (224, 224, 3) and tile.mean() < 220


def test_grids_at_different_levels_agree(pyramidal_tiff: Path) -> None:
    with open_slide(pyramidal_tiff) as slide:
        fine = TileGrid(slide, target_mpp=1.0, tile_px=112)
        coarse = TileGrid(slide, target_mpp=2.0, tile_px=56)
        assert fine.level == 1 and coarse.level == 2
        assert fine.shape == coarse.shape
        np.testing.assert_array_equal(fine.origins, coarse.origins)
        assert np.abs(fine.tissue - coarse.tissue).mean() < 0.05
