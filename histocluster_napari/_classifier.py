"""The widget's tile classifier, as plain functions run in a worker thread (no Qt).

``train_and_apply`` saves the run's curation, trains ``engine.classify.train`` from it (named
clusters plus per-tile overrides: review answers are overrides too), predicts every slide of the
store with ``engine.classify.apply`` and reads the maps back. The model lives beside the store,
in ``<store>.classifiers/<run>.npz|.json``; the prediction is ``predictions/<run>`` in the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import classify
from engine import export as engine_export
from engine.progress import Progress, no_progress
from engine.store import FeatureStore
from histocluster_napari._gallery import GalleryTile
from histocluster_napari._session import ClusterView, ExportReport, save_curation

N_UNCERTAIN = 24
"""Tiles "Review uncertain" shows."""
STAGES = {
    "labels": "gathering training tiles",
    "cross-validation": "cross-validating",
    "fit": "fitting the classifier",
    "predict": "predicting tiles",
}


@dataclass
class PredictionView:
    """A prediction as the widget shows it: per slide, the class map and the confidence map."""

    name: str
    model_path: Path
    classes: list[str]
    colours: list[str]
    classes_map: dict[str, np.ndarray]  # slide id -> (rows, cols) int16, -1 no prediction
    confidence: dict[str, np.ndarray]  # slide id -> (rows, cols) float32 max prob, 0 outside
    metrics: dict = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def model_path(view: ClusterView) -> Path:
    """Where the widget keeps the classifier of the view's run (beside the store)."""
    return Path(str(view.store_path) + ".classifiers") / view.run


def train_and_apply(
    view: ClusterView, folds: int = 5, *, progress: Progress = no_progress
) -> PredictionView:
    """Train from the view's curation (saved first), predict the whole store, read the maps."""
    save_curation(view)
    cfg = classify.TrainConfig(
        store=str(view.store_path),
        out=str(model_path(view)),
        run=view.run,
        folds=int(folds),
        quiet=True,
    )
    trained = classify.train(cfg, progress=progress)
    classify.apply(
        classify.ApplyConfig(
            model=str(trained.model_path),
            store=str(view.store_path),
            name=view.run,
            overwrite=True,
            quiet=True,
        ),
        progress=progress,
    )
    pred = read_prediction(view.store_path, view.run, trained.model_path)
    pred.metrics, pred.counts = dict(trained.metrics), dict(trained.counts)
    return pred


def read_prediction(store_path: Path, name: str, model: Path | None = None) -> PredictionView:
    """The store's prediction ``name``: class map and max probability of every slide."""
    maps = FeatureStore.open(store_path).prediction(name)
    classes_map, confidence = {}, {}
    for sid in maps.slide_ids():
        cls, prob = maps.read(sid)
        classes_map[sid] = np.asarray(cls)
        conf = prob.max(axis=-1) if prob.shape[-1] else np.zeros(cls.shape, np.float32)
        confidence[sid] = np.where(cls >= 0, conf, 0.0).astype(np.float32)
    attrs = maps.attrs
    return PredictionView(
        name,
        Path(model or attrs.get("model", "")),
        list(maps.classes),
        list(attrs.get("colours", [])),
        classes_map,
        confidence,
    )


def uncertain(store_path: Path, name: str, n: int = N_UNCERTAIN) -> list[GalleryTile]:
    """The ``n`` least certain tiles of the prediction, as gallery tiles (distance = margin)."""
    found = classify.uncertain_tiles(FeatureStore.open(store_path), name, int(n))
    return [GalleryTile(sid, r, c, float(m), False) for sid, r, c, m in found]


def export_predicted(
    view: ClusterView,
    pred: PredictionView,
    classes: list[str],
    out_dir: Path,
    min_prob: float,
    *,
    progress: Progress = no_progress,
) -> ExportReport:
    """``python -m engine.export STORE --predictions NAME --classes ... --min-prob P --geojson``."""
    cfg = engine_export.ExportConfig(
        store=view.store_path,
        out=Path(out_dir),
        predictions=pred.name,
        classes=tuple(classes),
        min_prob=float(min_prob),
        geojson=True,
        quiet=True,
    )
    return ExportReport.of(out_dir, engine_export.run(cfg, progress=progress))
