"""Geometry of the cluster overlay: one label pixel per tile, centred on the tile's pixels."""

from __future__ import annotations

import numpy as np
import pytest

from histocluster_napari._overlay import GridGeometry, label_image, labels_colormap


def world_edges(geom: GridGeometry, row: int, col: int) -> np.ndarray:
    """(y0, x0, y1, x1) world edges of label pixel (row, col) as napari draws it."""
    (sy, sx), (ty, tx) = geom.scale, geom.translate
    cy, cx = row * sy + ty, col * sx + tx
    return np.array([cy - sy / 2, cx - sx / 2, cy + sy / 2, cx + sx / 2])


@pytest.mark.parametrize("mpp", [(0.5, 0.5), (0.25, 0.3)])
def test_label_pixel_covers_exactly_its_tile(mpp: tuple[float, float]) -> None:
    tile = (448.0, 373.33)
    geom = GridGeometry(mpp, tile, tile, rows=5, cols=7)
    for row, col in [(0, 0), (2, 3), (4, 6)]:
        x0, y0, x1, y1 = geom.tile_bounds_l0(row, col)
        # level-0 pixel j of the slide layer (scale mpp) spans world [(j - 0.5), (j + 0.5)] * mpp
        want = np.array(
            [(y0 - 0.5) * mpp[1], (x0 - 0.5) * mpp[0], (y1 - 0.5) * mpp[1], (x1 - 0.5) * mpp[0]]
        )
        np.testing.assert_allclose(world_edges(geom, row, col), want)


def test_overlapping_tiles_centre_their_cell_on_the_tile() -> None:
    geom = GridGeometry((0.5, 0.5), (224.0, 224.0), (112.0, 112.0), rows=3, cols=3)
    y0, x0, y1, x1 = world_edges(geom, 1, 2)
    tx0, ty0, tx1, ty1 = geom.tile_bounds_l0(1, 2)
    np.testing.assert_allclose(
        [(x0 + x1) / 2, (y0 + y1) / 2],
        [((tx0 + tx1) / 2 - 0.5) * 0.5, ((ty0 + ty1) / 2 - 0.5) * 0.5],
    )
    np.testing.assert_allclose([x1 - x0, y1 - y0], [56.0, 56.0])  # one stride


def test_tile_at_inverts_the_transform() -> None:
    geom = GridGeometry((0.5, 0.5), (100.0, 100.0), (100.0, 100.0), rows=4, cols=5)
    mpp = 0.5
    assert geom.tile_at((0.0, 0.0)) == (0, 0)  # centre of level-0 pixel (0, 0)
    assert geom.tile_at((99 * mpp, 99 * mpp)) == (0, 0)
    assert geom.tile_at((100 * mpp, 99 * mpp)) == (1, 0)
    assert geom.tile_at((399 * mpp, 499 * mpp)) == (3, 4)
    assert geom.tile_at((400 * mpp, 0.0)) is None
    assert geom.tile_at((-1.0, 0.0)) is None
    assert geom.tile_at((100 * mpp + 10, 10.0), offset_yx=(10.0, 0.0)) == (1, 0)


def test_labels_and_colours() -> None:
    labels = np.array([[-1, 0], [2, 1]], np.int16)
    np.testing.assert_array_equal(label_image(labels), [[0, 1], [3, 2]])
    colors = np.array([[1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], np.float32)
    cmap = labels_colormap(colors, visible={1})
    mapped = cmap.map(np.arange(4))
    np.testing.assert_allclose(mapped[:, 3], [0, 0, 1, 0])
    np.testing.assert_allclose(mapped[2], [0, 1, 0, 1])
    assert np.all(labels_colormap(colors).map(np.arange(1, 4))[:, 3] == 1)
