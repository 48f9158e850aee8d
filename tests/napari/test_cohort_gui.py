"""A cohort in the widget (real viewer, Xvfb): three slides, one K-means, one slide shown at a
time, the gallery of a cluster across slides, a multi-slide store through the reader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.slide import slide_id
from engine.store import FeatureStore
from engine.tiling import Tiling
from histocluster_napari._cluster_table import COL_COUNT, COL_SLIDE
from histocluster_napari._gallery import gallery_order
from histocluster_napari._session import ClusterJob, cluster
from histocluster_napari._tile_outlines import MARK, OUTLINE_SUBS
from histocluster_napari._widget import MARK_LAYER, HistoClusterWidget
from tests.napari.conftest import FAST
from tests.napari.test_widget import TIMEOUT_MS, wait_idle

pytestmark = pytest.mark.gui
SLIDES = ["CMU-1-Small-Region", "sample_slide", "second_slide"]


def cohort_widget(make_napari_viewer, folder: Path, store: Path, **settings):
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    for name, value in {**FAST, **settings}.items():
        getattr(widget, name).value = value
    widget.store.value = str(store)
    widget.open_folder(folder)
    return viewer, widget


def shown(qtbot, widget) -> None:
    """Wait until the slide chosen is on the canvas (slides are opened in the background) and
    the widget's layers are made (at plugin start, each drawn once, transparent, then hidden)."""
    qtbot.waitUntil(lambda: not widget.slide_loading and widget.layers_ready, timeout=TIMEOUT_MS)


def visible(viewer) -> list:
    """The layers shown (the widget keeps its other layers hidden until it draws in them)."""
    return [layer for layer in viewer.layers if layer.visible]


def kinds(viewer) -> list[str]:
    return [type(layer).__name__ for layer in visible(viewer)]


@pytest.fixture(scope="module")
def cohort_store(tmp_path_factory, cohort_dir) -> Path:
    """The cohort extracted and clustered once, headless (tests copy it)."""
    store = tmp_path_factory.mktemp("cohort_store") / "cohort.zarr"
    tiling = Tiling(tile_px=FAST["tile_px"], target_mpp=FAST["target_mpp"])
    slides = tuple(sorted(cohort_dir.iterdir()))
    cluster(ClusterJob(slides, None, FAST["encoder"], tiling, FAST["k"], store))
    return store


@pytest.fixture
def clustered_cohort(make_napari_viewer, qtbot, cohort_dir, cohort_store, tmp_path, isolated_cache):
    """A viewer and widget on a copy of the clustered cohort, opened as a folder."""
    store = tmp_path / "cohort.zarr"
    shutil.copytree(cohort_store, store)
    viewer, widget = cohort_widget(make_napari_viewer, cohort_dir, store)
    qtbot.waitUntil(lambda: widget.view is not None and not widget.busy, timeout=TIMEOUT_MS)
    shown(qtbot, widget)
    return viewer, widget, store


def test_opening_a_folder_then_cluster_extracts_and_clusters_every_slide(
    make_napari_viewer, qtbot, cohort_dir, tmp_path, isolated_cache
):
    store = tmp_path / "cohort.zarr"
    viewer, widget = cohort_widget(make_napari_viewer, cohort_dir, store)
    assert widget.slide_list.slide_ids() == SLIDES
    shown(qtbot, widget)
    assert kinds(viewer) == ["Image"] and viewer.layers[0].name == SLIDES[0]
    assert [widget.slide_list.status_of(s) for s in SLIDES] == ["not extracted"] * 3
    widget.run_cluster()
    wait_idle(qtbot, widget)
    assert widget.view is not None, widget.status.value
    assert widget.view.slide_ids == SLIDES and FeatureStore.open(store).cluster_runs() == [
        widget.view.run
    ]
    statuses = lambda: [widget.slide_list.status_of(s) for s in SLIDES]  # noqa: E731
    qtbot.waitUntil(lambda: statuses() == ["encoded"] * 3, timeout=TIMEOUT_MS)  # read in a worker
    assert kinds(viewer) == ["Image", "Labels"]


def test_a_cohort_is_clustered_once_and_shown_one_slide_at_a_time(qtbot, clustered_cohort):
    viewer, widget, store = clustered_cohort
    view = widget.view
    assert view.slide_ids == sorted(SLIDES) and FeatureStore.open(store).cluster_runs() == [
        view.run
    ]
    assert [widget.slide_list.status_of(s) for s in SLIDES] == ["encoded"] * 3
    totals = [int(widget.table.item(i, COL_COUNT).text()) for i in range(FAST["k"])]
    assert totals == list(view.totals) and sum(totals) == sum(
        int((view.labels[s] >= 0).sum()) for s in SLIDES
    )
    for sid in [SLIDES[1], SLIDES[2], SLIDES[0]]:
        widget.slide_list.slide_chosen.emit(sid)  # what clicking its row does
        shown(qtbot, widget)
        assert kinds(viewer) == ["Image", "Labels"], [layer.name for layer in viewer.layers]
        image, labels = visible(viewer)
        assert image.name == sid and labels.name == f"{sid} clusters"
        np.testing.assert_array_equal(np.asarray(labels.data), view.labels[sid].astype(int) + 1)
        np.testing.assert_allclose(labels.scale, view.geometry[sid].scale)
        here = [int(widget.table.item(i, COL_SLIDE).text()) for i in range(FAST["k"])]
        assert here == list(view.counts[sid])
        assert image.metadata["histocluster"]["slide_path"].endswith(
            {"CMU-1-Small-Region": ".svs"}.get(sid, ".tiff")
        )


def test_gallery_shows_a_cluster_across_slides_and_a_click_jumps_to_the_tile(
    qtbot, clustered_cohort
):
    viewer, widget, store = clustered_cohort
    view = widget.view
    # The cluster present on the most slides.
    spread = [sum(int((view.labels[s] == c).any()) for s in SLIDES) for c in range(view.k)]
    cluster = int(np.argmax(spread))
    widget.table.cellClicked.emit(cluster, 1)  # clicking a row opens its gallery
    size = int(view.totals[cluster])
    qtbot.waitUntil(
        lambda: widget.gallery.count() == min(size, 24) and not widget.gallery_loading,
        timeout=TIMEOUT_MS,
    )
    tiles = widget.gallery.tiles()
    assert all(view.labels[s][r, c] == cluster for s, r, c in tiles)
    assert len({s for s, _, _ in tiles}) == spread[cluster]  # drawn from every slide it is on
    order = gallery_order(FeatureStore.open(store), view.run, cluster, view.labels)
    assert len(order) == size and [(t.slide_id, t.row, t.col) for t in order[: len(tiles)]] == tiles
    # Click a tile of a slide other than the one shown: that slide opens, centred on the tile.
    i = next(i for i, (s, _, _) in enumerate(tiles) if s != widget._current)
    sid, row, col = tiles[i]
    widget.gallery.click(i)
    shown(qtbot, widget)
    assert widget._current == sid and kinds(viewer)[:2] == ["Image", "Labels"]
    assert viewer.layers[0].name == sid
    labels = viewer.layers[f"{sid} clusters"]
    assert widget.tile_at(tuple(widget.camera.center[-2:])) == (row, col)
    mark = viewer.layers[MARK_LAYER]  # the tile's outline: its border, 12 label pixels a side
    sub = OUTLINE_SUBS[0]
    outline = np.asarray(mark.data[0])
    assert mark.visible and outline.shape == (sub, sub) and (outline == MARK).sum() == 4 * sub - 4
    centre = np.asarray(labels.data_to_world((row, col))[-2:])
    side = labels.scale[-1]  # (the grid's scale rounds the tile's level-0 side: ~1e-6)
    for corner, edge in ((-0.5, -0.5), (sub - 0.5, 0.5)):  # its edges: the tile's
        world = np.asarray(mark.data_to_world((corner, corner))[-2:])
        np.testing.assert_allclose(world, centre + edge * side, atol=1e-3 * side)
    # Another slide chosen in the list: no outline of this slide's tile over it; and back.
    other = next(s for s in SLIDES if s != sid)
    widget.slide_list.slide_chosen.emit(other)
    shown(qtbot, widget)
    assert widget._current == other and not mark.visible
    widget.slide_list.slide_chosen.emit(sid)
    shown(qtbot, widget)
    assert mark.visible
    # The store opened again (a new cohort): its slide of that name is not outlined.
    widget.open_store(store)
    qtbot.waitUntil(lambda: widget.view is not None and not widget.busy, timeout=TIMEOUT_MS)
    widget.slide_list.slide_chosen.emit(sid)
    shown(qtbot, widget)
    assert widget._current == sid and not mark.visible
    np.testing.assert_allclose(
        mark.data_to_world((-0.5, -0.5))[-2:], centre - side / 2, atol=1e-3 * side
    )


def test_a_multi_slide_store_opens_one_slide_in_the_reader(make_napari_viewer, clustered_cohort):
    _, widget, store = clustered_cohort
    viewer = make_napari_viewer()
    layers = viewer.open(str(store), plugin="histocluster")
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    sid = layers[0].name
    assert sid in SLIDES and layers[1].name == f"{sid} clusters"
    np.testing.assert_array_equal(
        np.asarray(layers[1].data), widget.view.labels[sid].astype(int) + 1
    )


def test_cohort_slide_ids_are_the_file_stems(cohort_dir):
    assert sorted(slide_id(p) for p in cohort_dir.iterdir()) == sorted(SLIDES)


def test_a_store_dropped_on_the_viewer_becomes_the_widget_cohort(
    make_napari_viewer, qtbot, clustered_cohort
):
    _, first, store = clustered_cohort
    first.curation.name_cluster(0, "stroma")
    first.save_curation()
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    viewer.open(str(store), plugin="histocluster")  # what drag and drop of the .zarr does
    qtbot.waitUntil(lambda: widget.view is not None and not widget.busy, timeout=TIMEOUT_MS)
    assert widget.slide_list.slide_ids() == SLIDES and widget.view.run == first.view.run
    assert widget.curation.name_of(0) == "stroma"
    shown(qtbot, widget)
    assert kinds(viewer) == ["Image", "Labels"]  # the reader's layers replaced, not stacked


def test_extract_all_shows_a_progress_bar_per_slide(
    make_napari_viewer, qtbot, cohort_dir, tmp_path, isolated_cache
):
    """During Extract all, each slide with tiles to encode has its own bar in the slide list;
    they end full (every pending tile counted once, on its own slide), then give way to counts."""
    store = tmp_path / "cohort.zarr"
    viewer, widget = cohort_widget(make_napari_viewer, cohort_dir, store)
    seen: list[dict] = []
    widget.slide_list.set_progress = _recording(widget.slide_list.set_progress, seen)
    widget.extract_all()
    qtbot.waitUntil(lambda: bool(widget.slide_list.progress()), timeout=TIMEOUT_MS)
    shown_bars = widget.slide_list.progress()
    assert set(shown_bars) <= set(SLIDES) and widget.busy
    wait_idle(qtbot, widget)
    assert widget.slide_list.progress() == {}  # the bars are gone, the counts are back
    last = {sid: counts for update in seen for sid, counts in update.items()}
    assert set(last) == set(SLIDES)  # every slide had tiles to encode
    store_ = FeatureStore.open(store)
    for sid, (done, total) in last.items():
        sf = store_.slide(sid)
        assert done == total == int(sf.selected.sum()), sid
    # Slide after slide: a slide's bar starts moving only once the one before is full.
    order = [s for s in widget.slide_list.slide_ids() if s in last]
    for update in seen:
        moving = [s for s in order if 0 < update[s][0] < update[s][1]]
        assert len(moving) <= 1, update
    qtbot.waitUntil(
        lambda: [widget.slide_list.status_of(s) for s in SLIDES] == ["encoded"] * 3,
        timeout=TIMEOUT_MS,
    )


def _recording(method, seen: list):
    def record(counts):
        seen.append(dict(counts))
        method(counts)

    return record


def test_a_cohort_shows_the_clusters_layer_selected(
    make_napari_viewer, qtbot, cohort_store, tmp_path, isolated_cache
):
    """Nothing the user sees was selected (the widget's layers are added unselected): once the
    cohort's clusters are shown, their layer is the active one, its controls in napari's panel."""
    store = tmp_path / "cohort.zarr"
    shutil.copytree(cohort_store, store)
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    assert widget.open_store(store) is not None
    wait_idle(qtbot, widget)
    shown(qtbot, widget)
    qtbot.waitUntil(lambda: widget.clusters_layer is not None and widget.clusters_layer.visible)
    qtbot.waitUntil(lambda: viewer.layers.selection.active is widget.clusters_layer)
