"""The map in a second viewer (real viewers, Xvfb): mosaic, cell clusters and tile points;
a click on a point jumps the slide viewer to that tile; a lasso assigns its tiles to a class as
per-tile overrides, drawn on the slide and honoured by export."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from engine.lasso import lasso_tiles
from histocluster_napari._map import CELL_PX, GRID
from tests.napari.test_curation_gui import clustered, manifest
from tests.napari.test_widget import wait_idle

pytestmark = pytest.mark.gui


def test_map_click_jumps_to_the_tile_and_lasso_overrides(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide, target_mpp=4.0)
    view = widget.view
    map_viewer = make_napari_viewer()
    assert widget.map_panel.open_map(map_viewer, method="pca") is not None
    wait_idle(qtbot, widget)
    m = widget.map_panel.map
    assert m is not None, widget.status.value
    n = int(sum((lab >= 0).sum() for lab in view.labels.values()))
    assert len(m.tile_map) == n  # every tile on the map
    names = [layer.name for layer in map_viewer.layers]
    assert names == ["mosaic", "cell clusters", "tiles", "cursor tile", "lasso"]
    assert map_viewer.layers["mosaic"].data.shape == (GRID * CELL_PX, GRID * CELL_PX, 3)
    assert len(map_viewer.layers["tiles"].data) == n

    # Click on tile i's point: the slide viewer centres on that tile.
    i = n // 2
    sid, row, col = m.tile_map.tile(i)
    point = map_viewer.layers["tiles"].data[i]
    assert widget.map_panel.click_at(tuple(point)) == (sid, row, col)
    rect = widget._tile_rect(row, col)
    np.testing.assert_allclose(widget.camera.center[-2:], rect.mean(axis=0), atol=1e-6)
    assert widget._query_tile == (row, col)
    # Hover names the tile; the tile under the slide cursor is ringed on the map.
    assert widget.map_panel.hover_at(tuple(point)) == (sid, row, col)
    assert widget.map_panel.text_overlay.text == f"{sid}, tile ({row}, {col})"
    assert widget.map_panel.highlight(sid, row, col) == i
    np.testing.assert_allclose(map_viewer.layers["cursor tile"].data, [point])
    # ... through the slide viewer's own mouse-move hook, over another tile of the slide.
    j = next(j for j in range(n) if m.tile_map.tile(j)[0] == sid and j != i)
    _, r2, c2 = m.tile_map.tile(j)
    [hook] = [cb for cb in viewer.mouse_move_callbacks if type(cb).__name__ == "_SlideHover"]
    hook(viewer, SimpleNamespace(position=tuple(widget._tile_rect(r2, c2).mean(axis=0))))
    np.testing.assert_allclose(map_viewer.layers["cursor tile"].data, [pts_of(map_viewer, j)])

    # Lasso a box around a few points: those tiles become 'ink' overrides.
    widget.table.set_name(0, "ink")
    pts = map_viewer.layers["tiles"].data
    lo, hi = pts[i] - 3 * CELL_PX, pts[i] + 3 * CELL_PX
    box = np.array([[lo[0], lo[1]], [lo[0], hi[1]], [hi[0], hi[1]], [hi[0], lo[1]]])
    map_viewer.layers["lasso"].add(box, shape_type="polygon")
    widget.map_panel.lasso_class.value = "ink"
    polygon_xy = m.grid.to_map(box + 0.5, CELL_PX)
    want = {
        (s, int(r), int(c))
        for s, (rows, cols) in lasso_tiles(m.tile_map, polygon_xy).items()
        for r, c in zip(rows, cols, strict=True)
    }
    assert (sid, row, col) in want
    assert widget.map_panel.assign_lasso() == len(want)
    overrides = widget.curation.overrides()
    assert {t for t, name in overrides.items() if name == "ink"} == want
    assert len(map_viewer.layers["lasso"].data) == 0
    label = np.asarray(widget.clusters_layer.data)[row, col]
    assert label == 1  # drawn as the first 'ink' cluster (0) on the slide
    # Export honours the lasso: ink = cluster 0's tiles plus the lassoed ones.
    widget.table.set_selected([0])
    out = tmp_path / "out"
    widget.export_dir.value = str(out)
    widget.export_selected()
    wait_idle(qtbot, widget)
    ink = {
        (r["slide_id"], int(r["row"]), int(r["col"])) for r in manifest(out) if r["class"] == "ink"
    }
    assert want <= ink


def pts_of(map_viewer, j: int) -> np.ndarray:
    return map_viewer.layers["tiles"].data[j]
