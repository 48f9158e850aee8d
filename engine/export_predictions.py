"""A stored prediction as ``engine.export``'s choice of tiles: :class:`PredictionChoice`.

``engine.classify apply`` writes ``predictions/<name>`` into the store: per slide a (rows, cols)
class map (-1 where not predicted) and (rows, cols, n_classes) probabilities. Export by
prediction writes a tile under class ``c`` only when its predicted class is ``c``, ``c`` is one
of the chosen classes, and the probability of ``c`` is at least ``min_prob``; nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError
from engine.export_choice import ExportClass
from engine.mosaic import cluster_colors
from engine.store import FeatureStore, PredictionMaps
from engine.tiling import Tiling

__all__ = ["PredictionChoice", "check_prediction_fits", "parse_colour"]


def parse_colour(text: Any, fallback: Sequence[int]) -> tuple[int, int, int]:
    """(r, g, b) 0-255 of ``#rrggbb`` or an [r, g, b] list; ``fallback`` when neither."""
    try:
        if isinstance(text, str) and len(text) == 7 and text.startswith("#"):
            return tuple(int(text[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        if isinstance(text, (list, tuple)) and len(text) == 3:
            return tuple(int(v) for v in text)  # type: ignore[return-value]
    except (TypeError, ValueError):
        pass
    return tuple(int(v) for v in fallback)  # type: ignore[return-value]


def check_prediction_fits(store: FeatureStore, maps: PredictionMaps) -> None:
    """Refuse (one line) a prediction made from features of another encoder or tiling than the store's."""
    attrs = maps.attrs
    where = f"{store.path}: prediction {maps.name!r}"
    fix = (
        "apply a classifier trained on this store's features (python -m engine.classify apply "
        f"MODEL {store.path} --name {maps.name} --overwrite)"
    )
    recorded = attrs.get("encoder")
    if not recorded:
        raise HistoclusterError(f"{where} records no encoder — {fix}")
    theirs = EncoderId.from_attrs(recorded)
    if not theirs.same_features(store.encoder):
        raise HistoclusterError(
            f"{where} was made from features of encoder {theirs.describe()}, the store holds "
            f"{store.encoder.describe()} (differ in {', '.join(theirs.differences(store.encoder))})"
            f" — {fix}"
        )
    if attrs.get("tiling"):
        diff = Tiling.from_attrs(attrs["tiling"]).differences(store.tiling)
        if diff:
            raise HistoclusterError(
                f"{where} was made on another tiling than the store's ({'; '.join(diff)}) — {fix}"
            )


class PredictionChoice:
    """A stored prediction's confident classes as a :class:`~engine.export_choice.TileChoice`.

    Args:
        store: the store holding ``predictions/<name>``.
        name: the prediction.
        classes: the class names to export, in output order (default: all of the prediction's).
        min_prob: a tile is exported when the probability of its predicted class is >= this.

    Raises:
        HistoclusterError: unknown prediction or class names (the known ones listed), a class
            named twice, ``min_prob`` outside [0, 1], a prediction of another encoder or tiling.
    """

    def __init__(
        self,
        store: FeatureStore,
        name: str,
        classes: Sequence[str] = (),
        min_prob: float = 0.5,
    ) -> None:
        if not (isinstance(min_prob, (int, float)) and 0.0 <= min_prob <= 1.0):
            raise HistoclusterError(
                f"--min-prob {min_prob} is not a probability — give a number from 0 to 1"
            )
        self.maps = store.prediction(name)
        check_prediction_fits(store, self.maps)
        self.name = name
        self.min_prob = float(min_prob)
        attrs = self.maps.attrs
        known = self.maps.classes
        chosen = list(classes) or list(known)
        unknown = [c for c in chosen if c not in known]
        if unknown:
            raise HistoclusterError(
                f"{store.path}: prediction {name!r} has no class "
                f"{', '.join(map(repr, unknown))} (classes: {', '.join(known)}) — fix --classes"
            )
        if len(set(chosen)) != len(chosen):
            raise HistoclusterError(f"{store.path}: --classes names a class twice — list each once")
        colours = list(attrs.get("colours") or [])
        palette = cluster_colors(len(known)).tolist()
        self.classes = [
            ExportClass(
                c,
                parse_colour(colours[known.index(c)] if known.index(c) < len(colours) else None,
                             palette[known.index(c)]),
                prediction=name,
            )
            for c in chosen
        ]  # fmt: skip
        # predicted class index -> export class index (-1: not exported)
        self._lut = np.full(len(known) + 1, -1, np.int16)  # last entry: class -1
        for i, c in enumerate(chosen):
            self._lut[known.index(c)] = i
        self._model = attrs.get("model_sha256")
        self._created = attrs.get("created")
        in_store = set(store.slide_ids())
        # the slides with maps (there is no cluster run: all are 'outside' it)
        self.extra_slides = [s for s in self.maps.slide_ids() if s in in_store]
        self.warnings = self._coverage_warnings(store, in_store)
        self._slide: str | None = None
        self._prob: np.ndarray = np.zeros((0, 0), np.float32)

    def _coverage_warnings(self, store: FeatureStore, in_store: set[str]) -> list[str]:
        """Lines naming the store's slides the prediction does not (fully) cover."""
        fix = f"run python -m engine.classify apply MODEL {store.path} --name {self.name} to predict them"
        missing = sorted(in_store - set(self.extra_slides))
        lines = []
        if missing:
            lines.append(
                f"{store.path}: prediction {self.name!r} has no maps for slide(s) "
                f"{', '.join(missing)} (added after it was made) — {fix}"
            )
        partial = [s for s in self.extra_slides if not self.maps.chunks_done(s).all()]
        if partial:
            lines.append(
                f"{store.path}: prediction {self.name!r} is unfinished on slide(s) "
                f"{', '.join(partial)} (an interrupted apply) — {fix}"
            )
        return lines

    def assign(self, slide_id: str, labels: np.ndarray) -> np.ndarray:
        """(rows, cols) int16 export class per tile: predicted, chosen and probable enough; else -1."""
        cls, prob = self.maps.read(slide_id)
        if cls.shape != tuple(np.shape(labels)):
            raise HistoclusterError(
                f"{self.maps.store.path}: prediction {self.name!r} of slide {slide_id!r} is "
                f"{cls.shape[0]} x {cls.shape[1]} tiles, the slide's grid {np.shape(labels)} — "
                "rerun engine.classify apply with --overwrite"
            )
        cls = cls.astype(np.int64)
        safe = np.where(cls < 0, 0, cls)
        p = np.take_along_axis(prob, safe[..., None], axis=2)[..., 0]
        p = np.where(cls < 0, np.nan, p)
        out = self._lut[np.where(cls < 0, len(self._lut) - 1, cls)]
        out = np.where(p >= self.min_prob, out, -1).astype(np.int16)
        self._slide, self._prob = slide_id, p
        return out

    def probability(self, slide_id: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """(n,) float64 probability of the predicted class of the given tiles."""
        if self._slide != slide_id:
            self.assign(slide_id, self.maps.read(slide_id)[0])
        return self._prob[np.asarray(rows), np.asarray(cols)].astype(np.float64)

    def key(self) -> Any:
        return {
            "prediction": self.name,
            "model_sha256": self._model,
            "created": self._created,
            "classes": [c.name for c in self.classes],
            "min_prob": self.min_prob,
        }

    def describe(self) -> dict[str, Any]:
        return {"kind": "prediction", **self.key(), "model": self.maps.attrs.get("model")}
