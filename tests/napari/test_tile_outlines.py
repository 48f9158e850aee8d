"""Tile outlines as label images: each tile's border in its value, placed on the tile's edges."""

from __future__ import annotations

import numpy as np
import pytest

from histocluster_napari._overlay import GridGeometry
from histocluster_napari._tile_outlines import (
    HIT,
    MARK,
    OUTLINE_SUBS,
    QUERY,
    outline_colormap,
    outline_levels,
    outline_placement,
)


def test_each_tile_gets_its_border_in_its_value_over_the_tiles_bounding_box():
    levels, origin = outline_levels([(5, 9), (7, 8), (5, 10)], [QUERY, HIT, HIT])
    assert origin == (5, 8)
    assert [lv.shape for lv in levels] == [(3 * s, 3 * s) for s in OUTLINE_SUBS]
    sub = OUTLINE_SUBS[0]
    top = levels[0]
    block = top[0:sub, sub : 2 * sub]  # tile (5, 9): row 0, column 1 of the box
    assert np.all(block[[0, -1], :] == QUERY) and np.all(block[:, [0, -1]] == QUERY)
    assert np.all(block[1:-1, 1:-1] == 0)
    assert (top == QUERY).sum() == 4 * sub - 4 and (top == HIT).sum() == 2 * (4 * sub - 4)
    assert np.all(top[sub : 2 * sub] == 0)  # row 6 holds no tile
    coarsest = levels[-1]  # one pixel a tile: filled
    assert OUTLINE_SUBS[-1] == 1
    np.testing.assert_array_equal(coarsest, [[0, QUERY, HIT], [0, 0, 0], [HIT, 0, 0]])


def test_a_tile_listed_twice_keeps_its_last_value_and_lengths_must_match():
    levels, _ = outline_levels([(0, 0), (0, 0)], [HIT, MARK])
    assert set(np.unique(levels[0])) == {0, MARK}
    with pytest.raises(ValueError, match="2 tiles but 1 outline values"):
        outline_levels([(0, 0), (1, 1)], [HIT])
    blank, origin = outline_levels([], [])
    assert origin == (0, 0) and all(not lv.any() for lv in blank)


def test_level_0_lies_on_the_edges_of_the_clusters_label_pixels():
    # stride != tile and non-square pixels: the outline's first pixel edge is the edge of
    # the clusters' label pixel of its origin tile (translate - scale / 2 of that pixel).
    geom = GridGeometry(mpp=(0.25, 0.5), tile_l0=(256, 128), stride_l0=(200, 100), rows=20, cols=30)
    origin = (4, 7)
    (oy, ox), (ty, tx) = outline_placement(geom, origin)
    (sy, sx), (gy, gx) = geom.scale, geom.translate
    sub = OUTLINE_SUBS[0]
    assert (oy, ox) == pytest.approx((sy / sub, sx / sub))
    assert ty - oy / 2 == pytest.approx(gy + origin[0] * sy - sy / 2)
    assert tx - ox / 2 == pytest.approx(gx + origin[1] * sx - sx / 2)
    # and its last pixel's far edge is the far edge of that tile's label pixel
    assert ty + (sub - 0.5) * oy == pytest.approx(gy + origin[0] * sy + sy / 2)


def test_the_colormap_draws_only_the_three_outline_values():
    cmap = outline_colormap()
    rgba = cmap.map(np.array([0, QUERY, HIT, MARK, 7]))
    assert rgba[0, 3] == 0 and rgba[4, 3] == 0
    np.testing.assert_allclose(rgba[1:4, :3], [[0, 1, 1], [1, 1, 0], [1, 0, 1]])
    assert np.all(rgba[1:4, 3] == 1)
