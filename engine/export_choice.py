"""Which tiles ``engine.export`` writes, and under which class name.

A :class:`TileChoice` gives, for each slide, every tile a class index or -1 (not exported).
Export never writes a tile whose index is -1, so a tile lands only under a name the choice gave
it. :class:`ClusterChoice` is the command line's whole clusters under names
(``--clusters 3,5 --names ink,crease``); ``engine.export_curation.CurationChoice`` is a curation's;
``engine.export_predictions.PredictionChoice`` is a classifier's confident predicted classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["ClusterChoice", "Color", "ExportClass", "TileChoice", "no_probability"]

Color = tuple[int, int, int]


def no_probability(rows: np.ndarray) -> np.ndarray:
    """(n,) NaN: the probabilities of a choice that has none."""
    return np.full(len(rows), np.nan)


@dataclass(frozen=True)
class ExportClass:
    """One class folder: its name, colour (r, g, b 0-255) and where its tiles come from.

    ``clusters``: the run's clusters it is made from; ``prediction``: the stored prediction whose
    class of that name it is (export by prediction), else None.
    """

    name: str
    color: Color
    clusters: tuple[int, ...] = ()
    prediction: str | None = None


class TileChoice(Protocol):
    """Which tiles go under which class (what export applies).

    ``classes``: the class folders, in output order. ``assign(slide_id, labels)`` gets a slide's
    (rows, cols) int run labels (-1 outside tissue, or all -1 for a slide outside the run, and
    for every slide of an export without a run) and returns (rows, cols) int16 indices into
    ``classes``, -1 for tiles not exported. ``probability(slide_id, rows, cols)``: (n,) float64,
    the probability of each given tile's class (after ``assign`` of that slide), NaN where the
    choice has none (clusters, curations). ``extra_slides``: slides outside the run that hold
    chosen tiles (without a run: every slide to export). ``key()``: a JSON value that
    changes whenever the assignment may change (part of the export's id: a rerun with the same
    key resumes, another key is another export). ``describe()``: recorded in ``export.json``.
    ``warnings``: lines for the user (e.g. overrides pointing at no tile).
    """

    @property
    def classes(self) -> Sequence[ExportClass]: ...

    @property
    def extra_slides(self) -> Sequence[str]: ...

    @property
    def warnings(self) -> Sequence[str]: ...

    def assign(self, slide_id: str, labels: np.ndarray) -> np.ndarray: ...

    def probability(self, slide_id: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray: ...

    def key(self) -> Any: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ClusterChoice:
    """Whole clusters under names: ``clusters[i]`` goes to class ``names[i]`` (names may repeat).

    Args:
        clusters: cluster numbers of the run (each once).
        names: one class name per cluster; a repeated name merges clusters into one class.
        colors: (k, 3) colours of the run's clusters; a class takes its first cluster's colour.
    """

    clusters: tuple[int, ...]
    names: tuple[str, ...]
    colors: tuple[Color, ...]

    @property
    def classes(self) -> list[ExportClass]:
        order: dict[str, list[int]] = {}
        for c, name in zip(self.clusters, self.names, strict=True):
            order.setdefault(name, []).append(c)
        return [ExportClass(n, self.colors[cs[0]], tuple(cs)) for n, cs in order.items()]

    @property
    def extra_slides(self) -> list[str]:
        return []

    @property
    def warnings(self) -> list[str]:
        return []

    def assign(self, slide_id: str, labels: np.ndarray) -> np.ndarray:
        index = {c.name: i for i, c in enumerate(self.classes)}
        lut = np.full(len(self.colors) + 1, -1, np.int16)  # last entry: label -1
        for c, name in zip(self.clusters, self.names, strict=True):
            lut[c] = index[name]
        labels = np.asarray(labels, dtype=np.int64)
        return lut[np.where(labels < 0, len(self.colors), labels)]

    def probability(self, slide_id: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return no_probability(rows)

    def key(self) -> Any:
        return {"clusters": list(self.clusters), "names": list(self.names)}

    def describe(self) -> dict[str, Any]:
        return {"kind": "clusters", **self.key()}
