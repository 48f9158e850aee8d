"""A k change in the widget repaints before its run is written (real viewer, Xvfb).

The session calls ``on_view(view)`` with the new clustering in memory, then writes the run and
its curation; the widget paints the view at once and stays busy until the write is complete.
Each test holds the worker right after that call (a direct connection on the widget's worker
bridge blocks the worker thread), so what the user sees during the write can be checked.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from qtpy.QtCore import Qt

from engine.curation import Curation
from engine.store import FeatureStore
from histocluster_napari._overlay import curated_label_image
from histocluster_napari._widget import HistoClusterWidget
from tests.napari.conftest import FAST
from tests.napari.test_curation_gui import clustered
from tests.napari.test_widget import TIMEOUT_MS, wait_idle

pytestmark = pytest.mark.gui


def hold_after_view(widget: HistoClusterWidget) -> threading.Event:
    """Block the worker once it has sent its painted view, until the returned event is set."""
    gate = threading.Event()

    def on_event(event: tuple) -> None:  # in the worker thread, after the queued delivery
        if event[0] == "view":
            gate.wait(TIMEOUT_MS / 1000)

    widget._bridge.event.connect(on_event, Qt.ConnectionType.DirectConnection)
    return gate


def shown_labels(widget: HistoClusterWidget) -> np.ndarray:
    return np.asarray(widget.clusters_layer.data)


def expected_labels(widget: HistoClusterWidget) -> np.ndarray:
    view, sid = widget.view, widget._current
    return curated_label_image(view.labels[sid], view.curation, sid)


def test_a_k_change_repaints_before_the_run_is_written_then_lists_it_with_its_curation(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    before = widget.view
    widget.curation.name_cluster(0, "ink")
    widget.save_curation()
    store_path = before.store_path
    runs = FeatureStore.open(store_path).cluster_runs()
    gate = hold_after_view(widget)
    try:
        widget.k.value = FAST["k"] + 1
        qtbot.waitUntil(
            lambda: widget.view is not before and not widget.drawing, timeout=TIMEOUT_MS
        )
        painted = widget.view
        # the overlay and the table show the new clustering while its run is being written
        assert painted.k == FAST["k"] + 1 and widget.table.rowCount() == painted.k
        np.testing.assert_array_equal(shown_labels(widget), expected_labels(widget))
        assert widget.clusters_layer.visible
        assert "ink" in painted.curation.names  # carried over in memory
        assert FeatureStore.open(store_path).cluster_runs() == runs  # not written yet
        assert widget.busy and not widget.cluster_button.enabled and not widget.k.enabled
        painted.curation.name_cluster(painted.k - 1, "crease")  # an edit while it is written
        widget.save_curation()  # deferred: the run is not there to save it beside
        assert FeatureStore.open(store_path).cluster_runs() == runs
    finally:
        gate.set()
    wait_idle(qtbot, widget)
    assert widget.view is painted
    store = FeatureStore.open(store_path)
    assert store.cluster_runs() == [*runs, painted.run]
    saved = Curation.load(store, painted.run)
    assert "ink" in saved.names and saved.name_of(painted.k - 1) == "crease"
    assert widget.cluster_button.enabled and widget.k.enabled


def test_a_cancel_while_the_run_is_written_leaves_it_whole(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    before = widget.view
    runs = FeatureStore.open(before.store_path).cluster_runs()
    gate = hold_after_view(widget)
    try:
        widget.k.value = FAST["k"] + 1
        qtbot.waitUntil(
            lambda: widget.view is not before and not widget.drawing, timeout=TIMEOUT_MS
        )
        widget.cancel()  # too late: nothing is reported after the repaint
    finally:
        gate.set()
    wait_idle(qtbot, widget)
    view = widget.view
    store = FeatureStore.open(before.store_path)
    assert store.cluster_runs() == [*runs, view.run]  # the one new run, listed: complete
    data = store.read_cluster_run(view.run)
    assert sorted(data.labels) == view.slide_ids and len(data.centroids) == view.k
    for sid in view.slide_ids:
        np.testing.assert_array_equal(data.labels[sid], view.labels[sid])
    assert Curation.load(store, view.run).k == view.k
    np.testing.assert_array_equal(shown_labels(widget), expected_labels(widget))


def test_a_failed_write_after_the_repaint_brings_the_previous_run_back(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, monkeypatch
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    before = widget.view
    runs = FeatureStore.open(before.store_path).cluster_runs()
    painted: list = []
    widget._bridge.event.connect(
        lambda e: painted.append(e[1]) if e[0] == "view" else None,
        Qt.ConnectionType.DirectConnection,
    )

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FeatureStore, "write_cluster_run", disk_full)
    widget.k.value = FAST["k"] + 1
    qtbot.waitUntil(lambda: bool(painted) and not widget.busy, timeout=TIMEOUT_MS)
    assert widget.view is before and widget.table.rowCount() == before.k
    assert widget.k.value == before.k
    np.testing.assert_array_equal(shown_labels(widget), expected_labels(widget))
    assert "No space left" in widget.status.value
    monkeypatch.undo()
    assert FeatureStore.open(before.store_path).cluster_runs() == runs
    widget.save_curation()  # the previous run's curation saves as before
    assert Curation.load(FeatureStore.open(before.store_path), before.run).k == before.k
