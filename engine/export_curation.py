"""A curation as ``engine.export``'s choice of tiles: :class:`CurationChoice`, :func:`load_curation`.

Export applies the curation's own rule (``Curation.class_map`` with ``selected_only``): per
class, the tiles of its selected named clusters, plus tiles an override moved into it, minus
excluded tiles. Unnamed or unselected clusters export nothing, so no tile is written under a
name the user did not give its cluster or the tile itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.curation import DOCUMENT, Curation
from engine.errors import HistoclusterError
from engine.export_choice import ExportClass, no_probability
from engine.export_dir import read_json
from engine.mosaic import cluster_colors
from engine.store import FeatureStore

__all__ = ["CurationChoice", "check_curation_fits", "load_curation"]


class CurationChoice:
    """A curation's export rule as a :class:`TileChoice`.

    Classes are ``curation.exported_classes()`` (names of selected clusters, then classes made by
    overrides alone); a class takes the colour of its first selected cluster, an override-only
    class a colour after the run's ``k``.

    Args:
        curation: the curation of the run being exported.
        store: the store (to find the slides holding overrides and the overrides that miss).
        colors: (k, 3) colours of the run's clusters.
        source: where the curation came from (recorded in export.json).
    """

    def __init__(
        self,
        curation: Curation,
        store: FeatureStore,
        colors: Sequence[Sequence[int]],
        source: str = "saved",
    ) -> None:
        self.curation = curation.copy()
        self.source = source
        names = self.curation.names
        selected = self.curation.selected
        self._names = self.curation.exported_classes()
        extra = [n for n in self._names if n not in names]
        palette = cluster_colors(curation.k + len(extra)).tolist() if extra else []
        classes = []
        for name in self._names:
            own = tuple(c for c in range(curation.k) if names[c] == name and selected[c])
            color = colors[own[0]] if own else palette[curation.k + extra.index(name)]
            classes.append(ExportClass(name, tuple(int(v) for v in color), own))  # type: ignore[arg-type]
        self.classes: list[ExportClass] = classes
        known = set(store.slide_ids())
        run_slides = set(store.read_cluster_run(curation.run, slide_ids=[]).attrs.get("slides", []))
        self.extra_slides = sorted((set(self.curation.override_slides()) & known) - run_slides)
        self.warnings: list[str] = self.curation.problems(store)

    def assign(self, slide_id: str, labels: np.ndarray) -> np.ndarray:
        return self.curation.class_map(slide_id, labels, self._names, selected_only=True)

    def probability(self, slide_id: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return no_probability(rows)

    def key(self) -> Any:
        doc = self.curation.to_json()
        doc.pop("history", None)  # the log of carried names does not change the tiles
        return doc

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "curation",
            "source": self.source,
            "classes": list(self._names),
            "overrides": self.curation.n_overrides(),
        }


def load_curation(
    store: FeatureStore, run: str | None, path: str | Path | None
) -> tuple[str, Curation, str] | None:
    """(run, curation, source) to export: the file ``path``, else the run's saved curation.

    ``run`` None means the file's run (with ``path``) or the store's latest run. Returns None
    when no file is given and the run has no saved curation. A file made for another run (name,
    ``k`` or creation time) is refused with one line.
    """
    if path is None:
        run = run or store.latest_cluster_run()
        if run is None:
            raise HistoclusterError(
                f"{store.path}: holds no cluster runs — run python -m engine.cluster first"
            )
        if store.read_run_json(run, DOCUMENT) is None:
            return None
        where = store.path / "clusters" / run / f"{DOCUMENT}.json"
        return run, Curation.load(store, run), str(where)
    path = Path(path)
    doc = read_json(path, "not a curation JSON", "give the curation.json of a cluster run")
    cur = Curation.from_json(doc, where=str(path))
    run = run or cur.run
    if cur.run != run:
        raise HistoclusterError(
            f"{path}: a curation of run {cur.run!r}, not {run!r} — pass --run {cur.run} or the "
            f"curation of run {run!r}"
        )
    check_curation_fits(store, cur, str(path))
    return run, cur, str(path.resolve())


def check_curation_fits(store: FeatureStore, curation: Curation, where: str) -> None:
    """Refuse (one line) a curation made for an earlier run of that name (another ``k`` or creation time)."""
    stored = store.read_cluster_run(curation.run, slide_ids=[])
    k, created = len(stored.centroids), stored.attrs.get("created")
    if curation.k != k or (curation.run_created is not None and curation.run_created != created):
        raise HistoclusterError(
            f"{where}: made for an earlier run named {curation.run!r} (k={curation.k}, created "
            f"{curation.run_created}; the run in {store.path} has k={k}, created {created}) — "
            "curate this run again"
        )
