"""The classifier in the widget (real viewer, Xvfb): train from the curation, the prediction and
confidence layers on the slide, review of uncertain tiles -> override -> retrain, export."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest

from engine.store import FeatureStore
from histocluster_napari._classifier_panel import RETRAIN_DELAY_MS
from tests.napari.test_curation_gui import cancel_at, clustered
from tests.napari.test_widget import TIMEOUT_MS, wait_idle

pytestmark = pytest.mark.gui


def test_train_review_retrain_and_export(
    make_napari_viewer, qtbot, sample_slide, isolated_cache, tmp_path, artifacts
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide, target_mpp=4.0)
    view, panel = widget.view, widget.classifier
    sid = widget._current
    assert panel.train() is None  # no classes yet: refused with a message
    assert "name at least two clusters" in widget.status.value
    widget.table.set_name(0, "a")
    widget.table.set_name(1, "b")
    assert panel.train() is not None
    wait_idle(qtbot, widget)
    pred = panel.prediction
    assert pred is not None, widget.status.value
    assert pred.classes == ["a", "b"]
    # The overlays: predicted classes (Labels, class + 1) and confidence (Image, 0-1) on the grid.
    labels, conf = panel.labels_layer, panel.confidence_layer
    assert labels in viewer.layers and conf in viewer.layers
    data = np.asarray(labels.data)
    tissue = view.labels[sid] >= 0
    assert data.shape == view.labels[sid].shape
    assert (data[tissue] >= 1).all() and (data[~tissue] == 0).all()
    assert tuple(labels.scale) == tuple(widget.clusters_layer.scale)
    assert conf.colorbar.visible and conf.colormap.name == "magma"
    c = np.asarray(conf.data)
    assert (c[tissue] >= 0.5).all() and (c <= 1.0).all()
    assert FeatureStore.open(view.store_path).prediction_names() == [view.run]

    # Review: the least certain tiles in the gallery, most uncertain first.
    panel.review()
    qtbot.waitUntil(
        lambda: widget.gallery.count() > 0 and not widget.gallery_loading, timeout=TIMEOUT_MS
    )
    first = widget.gallery.tiles()[0]
    prob = np.sort(FeatureStore.open(view.store_path).prediction(view.run).read(first[0])[1], -1)
    margins = prob[..., -1] - prob[..., -2]
    assert margins[first[1], first[2]] == pytest.approx(margins[tissue].min(), abs=1e-6)
    widget.gallery.click(0)
    start = time.perf_counter()
    widget.gallery.press_number(2)  # class 2 = "b"
    assert widget.curation.overrides()[first] == "b"
    assert "b" in widget.gallery.item(0).text()
    qtbot.waitUntil(lambda: panel.retrains == 1 and not widget.busy, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: panel.prediction is not pred, timeout=TIMEOUT_MS)
    took = time.perf_counter() - start  # a figure for people, not an assertion
    (artifacts / "retrain_time.txt").write_text(
        f"review answer -> retrain + re-predict + repaint: {took:.2f} s for "
        f"{sum(panel.prediction.counts.values())} labelled tiles (incl. the {RETRAIN_DELAY_MS} ms debounce)\n"
    )
    assert panel.prediction.counts["b"] == pred.counts["b"] + (first not in _b_tiles(view)), (
        panel.prediction.counts,
        pred.counts,
    )
    assert panel.labels_layer is labels  # redrawn in place
    assert np.asarray(labels.data)[first[1], first[2]] == 2  # the answer is learnt

    # Export predicted: the ImageFolder of engine.export --predictions.
    out = tmp_path / "predicted"
    widget.export_dir.value = str(out)
    panel.min_prob.value = 0.0
    assert panel.export() is not None
    wait_idle(qtbot, widget)
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == int(tissue.sum()), widget.status.value
    assert {r["class"] for r in rows} <= {"a", "b"}


def _b_tiles(view) -> set[tuple[str, int, int]]:
    """Tiles of cluster 1 (named b) in the run."""
    return {
        (s, int(r), int(c))
        for s in view.slide_ids
        for r, c in zip(*np.nonzero(view.labels[s] == 1), strict=True)
    }


def test_cancel_stops_training_and_keeps_the_clusters(
    make_napari_viewer, qtbot, sample_slide, isolated_cache
):
    viewer, _, widget = clustered(make_napari_viewer, qtbot, sample_slide)
    widget.table.set_name(0, "a")
    widget.table.set_name(1, "b")
    seen, _ = cancel_at(widget, "predict")
    assert widget.classifier.train() is not None
    wait_idle(qtbot, widget)
    assert any(s[0] == "fit" for s in seen) and any(s[0] == "predict" for s in seen)
    assert "Cancelled" in widget.status.value
    assert widget.classifier.prediction is None and widget.classifier.labels_layer is None
    assert widget.clusters_layer is not None and widget.clusters_layer.visible
    assert widget.classifier.train_button.enabled
