"""Unreadable tiles in the widget (real viewer, Xvfb): a slide with a corrupt JPEG tile is
extracted and clustered without an error, its unreadable tiles are hatched over the slide and
counted in the status and the slide list."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.store import FeatureStore
from histocluster_napari._overlay import HATCH_SUB
from histocluster_napari._slide_layers import UNREADABLE_GREY
from tests.napari.conftest import FAST
from tests.napari.test_widget import TIMEOUT_MS, wait_idle

pytestmark = pytest.mark.gui

POINT_L0 = (2560, 1536)
"""(x, y) level-0 pixel of the sample slide, in tissue: its JPEG tile is corrupted."""
THUMBNAIL_LEVEL = 2
"""The level the tissue finder reads whole (left intact: a slide without a thumbnail is a
failed slide, not unreadable tiles); tiles at FAST's 8 um/px are read from level 3."""


def damaged_copy(sample: Path, out: Path) -> Path:
    """The sample slide with the JPEG tile holding ``POINT_L0`` overwritten on every level but
    the thumbnail's (extraction: 4 of 16 tissue tiles unreadable)."""
    raw = bytearray(sample.read_bytes())
    rng = np.random.default_rng(0)
    with tifffile.TiffFile(sample) as tif:
        full = tif.series[0].levels[0].shape[1]
        for i, level in enumerate(tif.series[0].levels):
            if i == THUMBNAIL_LEVEL:
                continue
            page = level.keyframe
            d = full / level.shape[1]
            per_row = -(-page.imagewidth // page.tilewidth)
            t = (
                int(POINT_L0[1] / d) // page.tilelength * per_row
                + int(POINT_L0[0] / d) // page.tilewidth
            )
            o, c = page.dataoffsets[t], page.databytecounts[t]
            raw[o + 2 : o + c] = rng.integers(0, 256, c - 2, np.uint8).tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(bytes(raw))
    return out


def test_a_slide_with_unreadable_tiles_is_clustered_and_its_tiles_hatched(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    folder = tmp_path / "slides"
    damaged_copy(sample_slide, folder / "sample_slide.tiff")
    viewer = make_napari_viewer()
    from histocluster_napari._widget import HistoClusterWidget

    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    for name, value in FAST.items():
        getattr(widget, name).value = value
    widget.store.value = str(tmp_path / "features.zarr")
    widget.open_folder(folder)
    assert widget.run_cluster() is not None
    wait_idle(qtbot, widget)
    view = widget.view
    assert view is not None, widget.status.value  # not an error
    sf = FeatureStore.open(view.store_path).slide("sample_slide")
    failed = np.asarray(sf.failed)
    n = int(failed.sum())
    assert n >= 1 and view.n_failed == n
    assert (view.labels["sample_slide"][failed] == -1).all()  # not clustered
    assert f"{n} tiles could not be read" in widget.status.value
    # Hatched: red stripes over exactly the failed tiles, on the cluster layer's grid.
    layer = widget.failed_layer
    assert layer is not None and layer in viewer.layers and layer.visible
    data = np.asarray(layer.data)
    assert data.shape == (failed.shape[0] * HATCH_SUB, failed.shape[1] * HATCH_SUB)
    per_tile = data.reshape(failed.shape[0], HATCH_SUB, failed.shape[1], HATCH_SUB).sum((1, 3))
    assert np.array_equal(per_tile > 0, failed)
    clusters = widget.clusters_layer
    r, c = map(int, np.argwhere(failed)[0])
    centre = np.asarray(clusters.data_to_world((r, c)))
    hatch_centre = np.mean(
        [layer.data_to_world((r * HATCH_SUB + i, c * HATCH_SUB + i)) for i in (0, HATCH_SUB - 1)],
        axis=0,
    )
    np.testing.assert_allclose(hatch_centre, centre, atol=1e-6)
    # The slide list counts them.
    widget._refresh_slide_list(wait=True)
    assert widget.slide_list.status_of("sample_slide") == f"encoded, {n} unreadable"
    # The slide itself is shown, its unreadable pixels grey (the viewer salvages the region).
    qtbot.waitUntil(lambda: not widget.slide_loading, timeout=TIMEOUT_MS)
    coarse = np.asarray(widget._cohort_layer.data[-1])
    assert (coarse == UNREADABLE_GREY).all(axis=-1).any() and coarse.std() > 10
