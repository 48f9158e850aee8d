"""The classifier part of the HistoCluster widget: train, show the prediction, review, export.

"Train classifier" trains ``engine.classify`` from the run's curation and predicts every slide
(``_classifier.train_and_apply``, in the widget's worker, with its progress bar and Cancel). The
slide shown gets two layers, swapped with the slide like the cluster labels (data replaced in
place): the predicted classes (a Labels layer, the model's colours) and the confidence (max
probability, an Image layer, 0-1 on a colormap). "Review uncertain" fills the gallery with the
least certain tiles; a number key over a gallery tile (or "Assign" with the class chosen) makes
it a per-tile override of the curation, and the classifier is retrained in the background.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton, SpinBox
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap
from qtpy.QtCore import QTimer

from engine.errors import HistoclusterError
from engine.store import FeatureStore
from histocluster_napari import _classifier
from histocluster_napari._overlay import TRANSPARENT

PREDICTED_SUFFIX = " predicted"
CONFIDENCE_SUFFIX = " confidence"
CONFIDENCE_COLORMAP = "magma"
RETRAIN_DELAY_MS = 300
RETRAIN_FOLDS = 1
"""Retraining after a review answer skips cross-validation (it is the fit that must be quick)."""


def hex_rgba(colour: str) -> np.ndarray:
    """``#rrggbb`` -> (4,) float32 RGBA in [0, 1]."""
    c = colour.lstrip("#")
    return np.array([int(c[i : i + 2], 16) / 255 for i in (0, 2, 4)] + [1.0], np.float32)


def prediction_colormap(colours: list[str]) -> DirectLabelColormap:
    """Label ``class + 1`` in the class's colour, 0 (no prediction) transparent."""
    color_dict: dict[int | None, np.ndarray] = {None: TRANSPARENT, 0: TRANSPARENT}
    for i, c in enumerate(colours):
        color_dict[i + 1] = hex_rgba(c)
    return DirectLabelColormap(color_dict=color_dict, background_value=0)


class ClassifierPanel(Container):
    """Train / Review uncertain / Assign / Export predicted, over the widget's shown run."""

    def __init__(self, widget: Any) -> None:
        """``widget``: the ``HistoClusterWidget`` this panel belongs to (its worker, gallery, layers)."""
        super().__init__(labels=True)
        self._w = widget
        self.prediction: _classifier.PredictionView | None = None
        self.labels_layer: Labels | None = None
        self.confidence_layer: Image | None = None
        self.retrains = 0
        self._reviewing = False
        self.train_button = PushButton(
            text="Train classifier",
            tooltip="Train a tile classifier from the named clusters and per-tile corrections, "
            "then predict every slide",
        )
        self.review_button = PushButton(
            text="Review uncertain",
            tooltip="Show the least certain tiles in the gallery; a number key over one (1 = the "
            "first class) or Assign gives it a class, and the classifier retrains",
        )
        self.n_uncertain = SpinBox(label="uncertain tiles", value=_classifier.N_UNCERTAIN, min=1)
        self.review_class = ComboBox(label="assign class", choices=self._classes, nullable=True)
        self.assign_button = PushButton(text="Assign to the gallery tile")
        self.min_prob = FloatSpinBox(label="min prob", value=0.9, min=0.0, max=1.0, step=0.05)
        self.export_button = PushButton(
            text="Export predicted",
            tooltip="Export the tiles predicted with at least 'min prob' (every class) to "
            "'export to' through engine.export --predictions",
        )
        self.extend(
            [
                Container(
                    layout="horizontal",
                    widgets=[self.train_button, self.review_button],
                    labels=False,
                ),
                self.n_uncertain,
                self.review_class,
                self.assign_button,
                self.min_prob,
                self.export_button,
            ]
        )
        self.native.setContentsMargins(0, 0, 0, 0)
        self._retrain_timer = QTimer()
        self._retrain_timer.setSingleShot(True)
        self._retrain_timer.timeout.connect(self.retrain)
        self.train_button.changed.connect(lambda _: self.train())
        self.review_button.changed.connect(lambda _: self.review())
        self.assign_button.changed.connect(lambda _: self.assign_current())
        self.export_button.changed.connect(lambda _: self.export())
        widget.gallery.number_pressed.connect(self._on_number)

    def _classes(self, _widget: Any = None) -> list[str]:
        return [] if self.prediction is None else list(self.prediction.classes)

    def set_busy(self, busy: bool) -> None:
        for b in (self.train_button, self.export_button):
            b.enabled = not busy

    # ------------------------------------------------------------------ train

    def train(self, folds: int = 5) -> Any:
        """Train from the shown run's curation and predict the cohort, in the widget's worker."""
        w = self._w
        if w.view is None:
            w._fail("Train classifier: cluster first, then name at least two clusters")
            return None
        if len(w.view.curation.classes()) < 2:
            w._fail("Train classifier: name at least two clusters (two classes) first")
            return None
        if w.busy:
            return None
        w.status.value = "Training a classifier from the curation…"
        return w._start(_classifier.train_and_apply, w.view, folds, on_done=self._show)

    def retrain(self) -> Any:
        """Retrain and re-predict after review answers (waits while another job runs)."""
        if self._w.busy:
            self._retrain_timer.start(RETRAIN_DELAY_MS)
            return None
        self.retrains += 1
        return self.train(RETRAIN_FOLDS)

    def _show(self, pred: _classifier.PredictionView) -> None:
        self.prediction = pred
        self.review_class.reset_choices()
        self.redraw()
        counts = ", ".join(f"{c} {n}" for c, n in pred.counts.items())
        f1 = pred.metrics.get("macro_f1")
        cv = f", cross-validated macro F1 {f1}" if pred.metrics.get("folds") else ""
        self._w.status.value = (
            f"Classifier trained on {counts}{cv}; every slide predicted ('{pred.name}'). "
            "Review uncertain shows where it is least sure."
        )
        if self._reviewing:
            self.review()

    def open_saved(self, view: Any) -> None:
        """Show the prediction the store already holds for the view's run (a reopened store)."""
        try:
            if view.run in FeatureStore.open(view.store_path).prediction_names():
                self.prediction = _classifier.read_prediction(view.store_path, view.run)
                self.review_class.reset_choices()
        except HistoclusterError as e:
            self._w.status.value = f"the saved prediction could not be read: {e}"

    def forget(self) -> None:
        """The run changed: the prediction no longer applies (layers hidden, not removed)."""
        self.prediction = None
        self._reviewing = False
        self.review_class.reset_choices()
        for layer in (self.labels_layer, self.confidence_layer):
            if layer is not None and layer in self._w._viewer.layers and layer.visible:
                layer.visible = False

    # ------------------------------------------------------------------ layers

    def redraw(self) -> None:
        """Draw the shown slide's predicted classes and confidence (in place)."""
        w, pred, sid = self._w, self.prediction, self._w._current
        geom = w._geometry()
        if pred is None or sid is None or geom is None or sid not in pred.classes_map:
            self.forget_layers()
            return
        image = w._image_layer()
        base = image.name if image is not None else sid
        oy, ox = w._offset()
        place = {
            "scale": geom.scale,
            "translate": (geom.translate[0] + oy, geom.translate[1] + ox),
        }
        units = tuple(image.units[-2:]) if image is not None else None
        classes = (pred.classes_map[sid].astype(np.int32) + 1).clip(0).astype(np.uint16)
        conf = pred.confidence[sid]
        viewer = w._viewer
        if self.confidence_layer is None or self.confidence_layer not in viewer.layers:
            self.confidence_layer = viewer.add_image(
                conf,
                name=base + CONFIDENCE_SUFFIX,
                colormap=CONFIDENCE_COLORMAP,
                contrast_limits=(0.0, 1.0),
                opacity=0.5,
                visible=False,
                units=units,
                **place,
            )
            self.confidence_layer.colorbar.visible = True  # the legend, shown with the layer
        else:
            layer = self.confidence_layer
            layer.data = conf
            layer.scale, layer.translate = place["scale"], place["translate"]
            layer.name = base + CONFIDENCE_SUFFIX
            layer.contrast_limits = (0.0, 1.0)
        if self.labels_layer is None or self.labels_layer not in viewer.layers:
            self.labels_layer = viewer.add_labels(
                classes, name=base + PREDICTED_SUFFIX, units=units, **place
            )
            self.labels_layer.editable = False
            self.labels_layer.opacity = 0.6
        else:
            layer = self.labels_layer
            layer.data = classes
            layer.scale, layer.translate = place["scale"], place["translate"]
            layer.name = base + PREDICTED_SUFFIX
            layer.visible = True
        self.labels_layer.colormap = prediction_colormap(pred.colours)
        self.labels_layer.metadata = {
            **self.labels_layer.metadata,
            "histocluster": {"prediction": pred.name, "slide_id": sid, "classes": pred.classes},
        }
        if w.clusters_layer is not None:
            w.clusters_layer.visible = False  # the prediction replaces the clusters on view
        viewer.layers.selection.active = self.labels_layer

    def forget_layers(self) -> None:
        for layer in (self.labels_layer, self.confidence_layer):
            if layer is not None and layer in self._w._viewer.layers and layer.visible:
                layer.visible = False

    # ------------------------------------------------------------------ review

    def review(self) -> Any:
        """Fill the gallery with the ``n`` least certain tiles of the cohort."""
        w, pred = self._w, self.prediction
        if pred is None or w.view is None:
            w._fail("Review uncertain: train a classifier first")
            return None
        self._reviewing = True
        store, name, n = w.view.store_path, pred.name, int(self.n_uncertain.value)
        w.status.value = (
            f"The {n} least certain tiles: click one, then press its class's number "
            f"({', '.join(f'{i + 1} {c}' for i, c in enumerate(pred.classes))})."
        )

        def order() -> list:
            tiles = _classifier.uncertain(store, name, n)
            return [
                type(t)(t.slide_id, t.row, t.col, t.distance, False, f"margin {t.distance:.3f}")
                for t in tiles
            ]

        return w.fill_gallery(None, order)

    def _on_number(self, sid: str, row: int, col: int, n: int) -> None:
        if self.prediction is not None and 1 <= n <= len(self.prediction.classes):
            self.assign(sid, row, col, self.prediction.classes[n - 1])

    def assign_current(self) -> None:
        item = self._w.gallery.currentItem()
        name = self.review_class.value
        if item is None or not name:
            self._w._fail("Assign: click a gallery tile and choose its class under 'assign class'")
            return
        sid, row, col = item.data(self._w.gallery.ROLE)
        self.assign(sid, int(row), int(col), name)

    def assign(self, sid: str, row: int, col: int, name: str) -> None:
        """The review answer: tile (row, col) of ``sid`` is ``name`` (an override), then retrain."""
        w = self._w
        if w.view is None:
            return
        w.view.curation.override_tile(sid, row, col, name)
        w.gallery.mark(sid, row, col, name)
        w.status.value = f"{sid}, tile ({row}, {col}) is {name!r}; retraining…"
        self._retrain_timer.start(RETRAIN_DELAY_MS)

    # ------------------------------------------------------------------ export

    def export(self) -> Any:
        """Export the predicted tiles (every class, prob >= min prob) through ``engine.export``."""
        w, pred = self._w, self.prediction
        if pred is None or w.view is None:
            w._fail("Export predicted: train a classifier first")
            return None
        out = w.export_folder("Export predicted")
        if out is None:
            return None
        w.status.value = f"Exporting predicted tiles (prob >= {self.min_prob.value:g}) to {out}…"
        return w._start(
            _classifier.export_predicted,
            w.view,
            pred,
            list(pred.classes),
            out,
            float(self.min_prob.value),
            on_done=w._show_export,
        )
