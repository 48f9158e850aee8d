"""The HistoCluster widget driven through a real napari viewer (make_napari_viewer, Xvfb)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import Qt, QTimer

from histocluster_napari._cluster_table import COL_COUNT
from histocluster_napari._tile_outlines import HIT, OUTLINE_SUBS, QUERY
from histocluster_napari._widget import HistoClusterWidget
from tests.conftest import SAMPLE_DATA
from tests.napari.conftest import ARTIFACTS, FAST

SAMPLE = SAMPLE_DATA / "sample_slide.tiff"

pytestmark = pytest.mark.gui
TIMEOUT_MS = 240_000


def open_with_widget(make_napari_viewer, slide: Path, store: Path | None = None, **settings):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(slide), plugin="histocluster")
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    assert widget.slide.value is layer
    for name, value in {**FAST, **settings}.items():
        getattr(widget, name).value = value
    if store is not None:
        widget.store.value = str(store)
    return viewer, layer, widget


def pixel_edges(layer) -> tuple[np.ndarray, np.ndarray]:
    """World (y, x) of the outer edges of a layer's first and last pixels (extent is centres)."""
    ext = layer.extent
    return ext.world[0] - ext.step / 2, ext.world[1] + ext.step / 2


def wait_idle(qtbot, widget: HistoClusterWidget) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=TIMEOUT_MS)


def test_cluster_puts_labels_on_the_tile_grid(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, slide_layer, widget = open_with_widget(make_napari_viewer, sample_slide)
    assert widget.run_cluster() is not None
    wait_idle(qtbot, widget)
    labels = widget.clusters_layer
    assert labels is not None, widget.status.value
    data = np.asarray(labels.data)
    assert data.shape == (4, 6)  # 1024 level-0 px tiles over 4032 x 5376
    assert set(np.unique(data)) <= {0, 1, 2, 3} and (data > 0).sum() >= FAST["k"]
    # The overlay covers the slide: equal extents within one tile (512 um).
    tile_um = FAST["tile_px"] * FAST["target_mpp"]
    lo_s, hi_s = pixel_edges(slide_layer)
    lo_l, hi_l = pixel_edges(labels)
    np.testing.assert_allclose(lo_l, lo_s, atol=1e-6)
    assert np.all(hi_l >= hi_s - 1e-6) and np.all(hi_l - hi_s < tile_um)
    # Tile (1, 2) covers level-0 px [2048, 3072) x [1024, 2048): its label pixel's centre is the
    # centre of those pixels in world coordinates, and the world point of level-0 pixel
    # (x=2048, y=1024) lies in it while (2047, 1023) does not.
    mpp = 0.5
    centre = np.asarray(labels.data_to_world((1, 2)))
    np.testing.assert_allclose(centre, ((1024 + 511.5) * mpp, (2048 + 511.5) * mpp))
    assert widget.tile_at((1024 * mpp, 2048 * mpp)) == (1, 2)
    assert widget.tile_at((1023 * mpp, 2047 * mpp)) == (0, 1)
    # The table lists k clusters whose counts add up to the tissue tiles of the overlay.
    assert widget.table.rowCount() == FAST["k"]
    counts = [int(widget.table.item(i, COL_COUNT).text()) for i in range(FAST["k"])]
    assert counts == [int((data == i + 1).sum()) for i in range(FAST["k"])]
    assert all(widget.table.exemplar_pixmap(i) is not None for i in range(FAST["k"]))
    # A second Cluster reuses the stored features (no encoding).
    stores = list((isolated_cache / "stores").glob("*.zarr"))
    assert len(stores) == 1
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert "features from the store" in widget.status.value


def test_store_reuse_follows_the_tissue_method_and_minimum_tissue(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    """FeatureStore.coverage decides reuse: another tissue rule re-extracts, never reuses."""
    from engine.store import FeatureStore
    from histocluster_napari._session import ENCODER_IDS

    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)

    def cluster() -> str:
        widget.run_cluster()
        wait_idle(qtbot, widget)
        return widget.status.value

    assert "encoded" in cluster()
    first = widget.job().store_path()
    loads = ENCODER_IDS.loads
    assert "features from the store" in cluster()
    assert ENCODER_IDS.loads == loads  # the encoder's identity is computed once per file state
    selected = {}
    for method, min_tissue in [("hsv", 0.5), ("otsu", 0.1)]:
        widget.tissue_method.value, widget.min_tissue.value = method, min_tissue
        assert widget.job().store_path() != first
        assert "encoded" in cluster(), (method, min_tissue)  # re-extracted, not reused
        store = FeatureStore.open(widget.job().store_path())
        assert (store.tiling.tissue_method, store.tiling.min_tissue) == (method, min_tissue)
        selected[method, min_tissue] = int(store.slide("sample_slide").selected.sum())
    assert selected["otsu", 0.1] > int(
        FeatureStore.open(first).slide("sample_slide").selected.sum()
    )
    widget.tissue_method.value, widget.min_tissue.value = "otsu", 0.5
    assert "features from the store" in cluster()  # the first cache store again
    # A store the user named, made with another tissue rule: refused with the reason, unchanged.
    widget.store.value = str(first)
    for method, min_tissue in [("hsv", 0.5), ("otsu", 0.1)]:
        widget.tissue_method.value, widget.min_tissue.value = method, min_tissue
        status = cluster()
        key = "tissue_method" if method == "hsv" else "min_tissue"
        assert key in status and "feature store" in status, status
        assert FeatureStore.open(first).tiling.tissue_method == "otsu"
        assert FeatureStore.open(first).tiling.min_tissue == 0.5


def test_worker_runs_off_the_gui_thread(make_napari_viewer, qtbot, sample_slide, isolated_cache):
    """While extraction + K-means run, the Qt event loop keeps processing timer events."""
    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    worker_threads: set[int] = set()
    widget._bridge.event.connect(  # runs in the emitting (worker) thread
        lambda *_: worker_threads.add(threading.get_ident()), Qt.ConnectionType.DirectConnection
    )
    ticks_while_busy = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks_while_busy.append((time.perf_counter(), widget.busy)))
    timer.start(10)
    widget.run_cluster()
    assert widget.busy and not widget.cluster_button.enabled and widget.cancel_button.enabled
    wait_idle(qtbot, widget)
    timer.stop()
    busy = [t for t, b in ticks_while_busy if b]
    assert len(busy) >= 3  # the GUI thread ran timers while the job was running
    # The longest the GUI thread went without running a 10 ms timer while the job ran: a figure
    # for people (left in test-artifacts/), not an assertion (timings depend on the machine).
    stall_ms = 1000 * float(np.max(np.diff(busy)))
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "ui_stall.txt").write_text(
        f"longest GUI-thread stall while extracting + clustering: {stall_ms:.0f} ms "
        f"({len(busy)} ticks of a 10 ms timer)\n"
    )
    assert worker_threads and threading.get_ident() not in worker_threads
    assert widget.clusters_layer is not None
    assert widget.cluster_button.enabled and not widget.cancel_button.enabled


def test_cancel_stops_extraction_and_cluster_resumes(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    from histocluster_napari._session import count_done

    # 88 tiles of 256 um: long enough to cancel in the middle.
    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide, target_mpp=4.0)
    store = widget.job().store_path()
    widget.run_cluster()
    qtbot.waitUntil(lambda: widget.progress_bar.max > 1, timeout=TIMEOUT_MS)  # encoding started
    widget.cancel_button.clicked.emit()
    wait_idle(qtbot, widget)
    assert "Cancelled" in widget.status.value
    assert widget.clusters_layer is None and widget.cluster_button.enabled
    done, total = count_done(store, "sample_slide")
    assert total == widget.progress_bar.max and done < total
    widget.run_cluster()  # resumes: encodes only what is missing
    wait_idle(qtbot, widget)
    assert widget.clusters_layer is not None
    assert f"encoded {total - done})" in widget.status.value


def test_clicking_tiles_selects_clusters_and_show_selected_only_hides_the_rest(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    widget.run_cluster()
    wait_idle(qtbot, widget)
    layer = widget.clusters_layer
    data = np.asarray(layer.data)
    row, col = np.argwhere(data > 0)[0]
    cluster = int(data[row, col]) - 1
    world = layer.data_to_world((row, col))
    assert widget.click_tile_at(tuple(world)) == cluster
    assert widget.table.selected() == [cluster]
    widget.show_selected_only.value = True
    colors = layer.colormap.map(np.arange(FAST["k"] + 1))
    alpha = colors[:, 3]
    assert alpha[0] == 0 and alpha[cluster + 1] == 1
    assert all(alpha[i + 1] == 0 for i in range(FAST["k"]) if i != cluster)
    widget.click_tile_at(tuple(world))  # clicking again unselects
    assert widget.table.selected() == []
    widget.show_selected_only.value = False
    assert np.all(layer.colormap.map(np.arange(1, FAST["k"] + 1))[:, 3] == 1)
    # Find similar marks the requested number of tiles, not the query itself.
    widget.n_similar.value = 4
    widget.find_similar()  # the hits are found in a worker, then marked
    qtbot.waitUntil(lambda: widget.similar_hits is not None, timeout=TIMEOUT_MS)
    hits = widget.similar_hits
    assert len(hits) == 4 and all((r, c) != (row, col) for r, c, _ in hits)
    marks = viewer.layers[f"{widget.slide.value.name} similar"]
    outline = np.asarray(marks.data[0])  # level 0: 12 label pixels per tile, the border set
    border = 4 * (OUTLINE_SUBS[0] - 1)
    assert (outline == QUERY).sum() == border and (outline == HIT).sum() == 4 * border
    # The query's outline covers exactly the tile's level-0 pixels (world edges at -0.5 px).
    mpp, side = 0.5, 1024
    y0, x0, y1, x1 = (np.array([row, col, row + 1, col + 1]) * side - 0.5) * mpp
    inset = side * mpp / OUTLINE_SUBS[0] / 4  # a quarter of an outline's width

    def outline_at(y: float, x: float) -> int:
        outline = np.asarray(marks.data[0])
        i, j = np.floor(np.asarray(marks.world_to_data((y, x))[-2:]) + 0.5).astype(int)
        inside = 0 <= i < outline.shape[0] and 0 <= j < outline.shape[1]
        return int(outline[i, j]) if inside else 0

    assert outline_at(y0 + inset, x0 + inset) == QUERY == outline_at(y1 - inset, x1 - inset)
    assert outline_at((y0 + y1) / 2, x0 + 5 * inset) == 0  # hollow
    assert QUERY not in (outline_at(y0 - inset, x0 + inset), outline_at(y1 + inset, x1 - inset))
    left_edge = lambda r, c: (((r + 0.5) * side - 0.5) * mpp, (c * side - 0.5) * mpp + inset)  # noqa: E731
    for r, c, _ in hits:  # each hit outlined, at its own tile
        assert outline_at(*left_edge(r, c)) == HIT
    # Of two queries in a row, only the last one's hits are kept and marked.
    other = hits[0][:2]
    widget.find_similar((row, col))
    widget.find_similar(other)
    qtbot.waitUntil(lambda: widget.similar_hits is not None, timeout=TIMEOUT_MS)
    qtbot.wait(300)  # the first query's result, arriving after, is dropped
    assert all((r, c) != other for r, c, _ in widget.similar_hits)
    assert outline_at(*left_edge(*other)) == QUERY
    # The hits of a slide no longer shown are dropped, and the status says so (not "Finding…").
    widget.find_similar((row, col))
    assert widget.status.value.startswith("Finding")
    widget._on_similar_found((widget._similar_generation, "another_slide", (row, col), [], None))
    assert "no longer shown" in widget.status.value and widget.similar_hits is None
    qtbot.waitUntil(lambda: widget.similar_hits is not None, timeout=TIMEOUT_MS)  # its own
    # The outlines' layer deleted by the user: the next query makes another.
    viewer.layers.remove(marks)
    widget.find_similar((row, col))
    qtbot.waitUntil(lambda: widget.similar_hits is not None, timeout=TIMEOUT_MS)
    marks = viewer.layers[f"{widget.slide.value.name} similar"]
    assert outline_at(y0 + inset, x0 + inset) == QUERY


def test_k_change_reclusters_from_stored_features(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    widget.run_cluster()
    wait_idle(qtbot, widget)
    widget.k.value = 2
    qtbot.waitUntil(lambda: widget.table.rowCount() == 2 and not widget.busy, timeout=TIMEOUT_MS)
    assert int(np.asarray(widget.clusters_layer.data).max()) <= 2
    assert "features from the store" in widget.status.value


def test_bad_checkpoint_is_a_notification_not_a_traceback(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    bad = tmp_path / "encoder.pt"
    bad.write_bytes(b"not a checkpoint")
    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide, encoder=str(bad))
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert widget.clusters_layer is None
    assert str(bad) in widget.status.value and "—" in widget.status.value


def test_slide_without_mpp_asks_for_it_in_the_widget(
    make_napari_viewer, qtbot, tmp_path, isolated_cache
):
    import tifffile

    from engine.slide import open_slide

    with open_slide(SAMPLE) as src:
        rgb = src.read_region((0, 0), 2, src.level_dimensions[2])  # 1344 x 1008 px
    path = tmp_path / "nompp.tiff"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb")
    viewer, layer, widget = open_with_widget(
        make_napari_viewer, path, tile_px=64, target_mpp=4.0, k=2
    )
    assert not widget.slide_mpp.native.isHidden()  # shown (the viewer window itself is not)
    assert widget.run_cluster() is None  # refused with a message naming the field
    assert "slide um/px" in widget.status.value
    widget.slide_mpp.value = 2.0
    np.testing.assert_allclose(layer.scale, (2.0, 2.0))
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert widget.clusters_layer is not None, widget.status.value
    assert np.asarray(widget.clusters_layer.data).shape == (
        8,
        11,
    )  # 256 um tiles over 2016 x 2688 um


def test_export_selected_writes_the_files_the_manifest_lists(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    import csv
    import json

    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    widget.run_cluster()
    wait_idle(qtbot, widget)
    data = np.asarray(widget.clusters_layer.data)
    widget.table.set_selected([0, 2])
    widget.table.set_name(0, "ink")
    widget.table.set_name(2, "crease")
    out = tmp_path / "patches"
    widget.export_dir.value = str(out)
    assert widget.export_selected() is not None
    wait_idle(qtbot, widget)
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    listed = {row["path"] for row in rows}
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*.png")}
    assert listed == on_disk and len(rows) == (data == 1).sum() + (data == 3).sum()
    assert {row["class"] for row in rows} == {"ink", "crease"}
    assert sum(row["class"] == "ink" for row in rows) == (data == 1).sum()
    geojson = json.loads((out / f"{rows[0]['slide_id']}.geojson").read_text())
    names = {f["properties"]["classification"]["name"] for f in geojson["features"]}
    assert names == {"ink", "crease"}
    assert f"Exported {len(rows)} patches" in widget.status.value


def test_export_refuses_bad_names_with_a_visible_message(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path
):
    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    widget.run_cluster()
    wait_idle(qtbot, widget)
    widget.table.set_selected([0, 1])
    out = tmp_path / "patches"
    widget.export_dir.value = str(out)
    for first, second in [("a/b", "fine"), ("..", "fine"), ("", "fine"), ("Ink", "ink")]:
        widget.table.set_name(0, first)
        widget.table.set_name(1, second)
        widget.status.value = ""
        assert widget.export_selected() is None
        assert "class name" in widget.status.value and "—" in widget.status.value, (first, second)
    assert not out.exists()


def test_screenshot_differs_where_the_overlay_is(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, artifacts
):
    from PIL import Image

    viewer = make_napari_viewer(show=True)
    [slide_layer] = viewer.open(str(sample_slide), plugin="histocluster")
    widget = HistoClusterWidget(viewer)
    for name, value in FAST.items():
        getattr(widget, name).value = value
    widget.run_cluster()
    wait_idle(qtbot, widget)
    labels = widget.clusters_layer
    viewer.reset_view()
    qtbot.wait(200)
    shots = {}
    for name, slide_on, labels_on in [("with", 1, 1), ("without", 1, 0), ("overlay_only", 0, 1)]:
        slide_layer.visible, labels.visible = bool(slide_on), bool(labels_on)
        qtbot.wait(100)
        shots[name] = viewer.screenshot(canvas_only=True, flash=False)[..., :3]
        Image.fromarray(shots[name]).save(artifacts / f"widget_overlay_{name}.png")
    overlay = shots["overlay_only"].max(axis=2) > 0  # where labels are drawn (black background)
    changed = np.abs(shots["with"].astype(int) - shots["without"].astype(int)).max(axis=2) > 8
    assert overlay.mean() > 0.05
    assert changed[overlay].mean() > 0.9  # the overlay changes what is under it...
    assert changed[~overlay].mean() < 0.01  # ...and nothing else


def test_closing_the_widget_does_not_keep_it_alive_in_the_viewer(
    make_napari_viewer, qtbot, sample_slide
):
    import gc
    import weakref

    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    hooks = widget._viewer_hooks
    assert hooks.on_mouse in viewer.mouse_drag_callbacks
    viewer.window.remove_dock_widget(widget.native)
    ref = weakref.ref(widget)
    del widget
    gc.collect()
    assert ref() is None  # the viewer's callbacks hold the widget weakly
    hooks.on_find_similar(viewer)  # a hook firing after the widget is gone removes itself
    assert hooks.on_mouse not in viewer.mouse_drag_callbacks


def test_a_click_selects_but_a_drag_pans(make_napari_viewer, qtbot, sample_slide, isolated_cache):
    """Drive the viewer's mouse callback as napari does: press, (moves), release."""
    from types import SimpleNamespace

    viewer, _, widget = open_with_widget(make_napari_viewer, sample_slide)
    widget.run_cluster()
    wait_idle(qtbot, widget)
    data = np.asarray(widget.clusters_layer.data)
    row, col = np.argwhere(data > 0)[0]
    world = tuple(widget.clusters_layer.data_to_world((row, col)))

    def gesture(moves: list[tuple[float, float]]) -> None:
        event = SimpleNamespace(type="mouse_press", button=1, modifiers=(), position=world)
        gen = widget._viewer_hooks.on_mouse(viewer, event)
        next(gen)  # the press
        for pos in moves:
            event.type, event.position = "mouse_move", pos
            next(gen)
        event.type = "mouse_release"
        with pytest.raises(StopIteration):
            next(gen)

    gesture([(world[0] + 500.0, world[1] + 500.0)])  # a drag: pans, selects nothing
    assert widget.table.selected() == []
    gesture([])  # a click on the tile: selects its cluster
    assert widget.table.selected() == [int(data[row, col]) - 1]


def test_the_widgets_hidden_layers_leave_the_users_selection_alone(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    """The layers made at plugin start (slide, clusters, outlines) are added without becoming
    the active layer: the slide the user opened stays selected, its controls shown."""
    viewer, layer, widget = open_with_widget(make_napari_viewer, sample_slide)
    qtbot.waitUntil(lambda: widget.layers_ready, timeout=TIMEOUT_MS)
    assert len(viewer.layers) >= 5  # the user's slide and the widget's four
    assert viewer.layers.selection.active is layer
    assert set(viewer.layers.selection) == {layer}
    assert viewer.layers._activate_on_insert  # restored for everyone else's layers
