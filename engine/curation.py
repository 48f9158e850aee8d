"""The curation of one cluster run: class names, export selection and per-tile overrides.

A :class:`Curation` belongs to one run ``clusters/<run>`` of one feature store. It says

- the class name of each cluster (or none),
- which clusters are selected for export,
- per-tile overrides: ``(slide_id, row, col)`` moved to a class, or excluded (``None``).

It is Qt-free and lightly evented (napari-animation's ``Animation`` is the example): observers
registered with :meth:`Curation.connect` receive a :class:`Change` after every edit; the napari
widget only observes and edits it. It is saved beside its run as ``clusters/<run>/curation.json``
through :meth:`FeatureStore.write_run_json` (atomic, versioned: :data:`FORMAT`, :data:`VERSION`).

The one rule of a tile's class (:meth:`Curation.class_of`, :meth:`Curation.class_map`,
:meth:`Curation.assignments`; export, the classifier and the overlay all go through it):

1. a tile with an override has the override's class, or none when excluded;
2. otherwise the name of its cluster in the run, or none when the cluster is unnamed or the
   tile is not labelled (-1, outside tissue).

With ``selected_only`` (export), a cluster's tiles count only when the cluster is selected, and
an override's tiles only when its class is exported (:meth:`Curation.exported_classes`: the
names of selected clusters, plus classes made by overrides alone, which name no cluster). So no
tile ever lands under a name the user did not give its cluster or the tile itself.

Carrying a curation onto another run (new k, seed, slides or store) is ``engine.curation_match``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

from engine.errors import HistoclusterError, StoreError
from engine.store import FeatureStore

__all__ = [
    "DOCUMENT",
    "FORMAT",
    "VERSION",
    "Change",
    "ClassTiles",
    "Curation",
    "check_name",
]

FORMAT = "histocluster-curation"
VERSION = 1
DOCUMENT = "curation"  # clusters/<run>/curation.json

TileKey = tuple[str, int, int]
"""(slide_id, row, col) of one tile."""

_ABSENT = object()

ChangeKind = Literal["name", "select", "override", "replace"]


@dataclass(frozen=True)
class Change:
    """What an edit changed, passed to every observer.

    ``kind``: ``name`` / ``select`` (``cluster`` set), ``override`` (``slide_id``, ``rows``,
    ``cols`` of the tiles whose override was set or cleared), ``replace`` (everything may have
    changed: :meth:`Curation.replace_with`).
    """

    kind: ChangeKind
    cluster: int | None = None
    slide_id: str | None = None
    rows: tuple[int, ...] = ()
    cols: tuple[int, ...] = ()


class ClassTiles(NamedTuple):
    """Tiles of one slide under one class: ``rows``, ``cols`` (N,) int64, ``clusters`` (N,) int16.

    ``clusters`` are the tiles' labels in the run (-1 where a tile outside the run's labels was
    moved to the class by an override); ``overridden`` (N,) bool marks tiles placed by an override.
    """

    slide_id: str
    class_name: str
    rows: np.ndarray
    cols: np.ndarray
    clusters: np.ndarray
    overridden: np.ndarray


def check_name(name: str | None) -> str | None:
    """A class name as stored: surrounding spaces dropped, ``None`` or blank -> ``None`` (no name).

    Folder-name rules (path separators, reserved names, case clashes) are the exporter's
    (``engine.export.check_class_names``); this model only refuses what can never be a name.
    """
    if name is None:
        return None
    if not isinstance(name, str):
        raise TypeError(f"class name must be a string or None, got {type(name).__name__}")
    name = name.strip()
    if not name:
        return None
    if any(ch in name for ch in "\n\r\t\x00"):
        raise ValueError(f"class name {name!r} contains a control character — use a plain name")
    return name


class Curation:
    """Names, selection and per-tile overrides of cluster run ``run`` (``k`` clusters).

    Make one with :meth:`for_run` (blank) or :meth:`load` (saved, else blank); save with
    :meth:`save`. ``run_created`` is the run's ``created`` attribute, so a curation is never
    applied to another run that later took the same name.
    """

    def __init__(
        self,
        run: str,
        k: int,
        *,
        run_created: str | None = None,
        names: Sequence[str | None] | None = None,
        selected: Sequence[bool] | None = None,
        overrides: Mapping[TileKey, str | None] | None = None,
        history: Sequence[str] = (),
    ) -> None:
        if k < 1:
            raise ValueError(f"a curation needs k >= 1 clusters, got {k}")
        self.run = str(run)
        self.k = int(k)
        self.run_created = run_created
        self._names: list[str | None] = [None] * self.k
        self._selected: list[bool] = [False] * self.k
        for c, name in enumerate(names or ()):
            self._names[self._cluster(c)] = check_name(name)
        for c, on in enumerate(selected or ()):
            self._selected[self._cluster(c)] = bool(on)
        self._overrides: dict[str, dict[tuple[int, int], str | None]] = {}
        for (sid, r, c), name in (overrides or {}).items():
            self._overrides.setdefault(str(sid), {})[(int(r), int(c))] = check_name(name)
        self.history: list[str] = list(history)
        self._observers: list[Callable[[Change], None]] = []

    # ------------------------------------------------------------------ making, saving

    @classmethod
    def for_run(cls, store: FeatureStore, run: str) -> Curation:
        """A blank curation of ``run`` (no names, nothing selected, no overrides)."""
        attrs, centroids = _run_identity(store, run)
        return cls(run, len(centroids), run_created=attrs.get("created"))

    @classmethod
    def load(cls, store: FeatureStore, run: str) -> Curation:
        """The curation saved beside ``run``, or a blank one when there is none.

        Raises ``StoreError`` when the saved document is damaged, from a newer histocluster,
        or made for an earlier run that had this name (another ``k`` or creation time).
        """
        doc = store.read_run_json(run, DOCUMENT)
        if doc is None:
            return cls.for_run(store, run)
        where = store.path / "clusters" / run / f"{DOCUMENT}.json"
        cur = cls.from_json(doc, where=str(where))
        attrs, centroids = _run_identity(store, run)
        if cur.k != len(centroids) or (
            cur.run_created is not None and cur.run_created != attrs.get("created")
        ):
            raise StoreError(
                f"{where}: made for an earlier run named {run!r} (k={cur.k}, created "
                f"{cur.run_created}; the run now has k={len(centroids)}, created "
                f"{attrs.get('created')}) — delete the file to curate this run afresh"
            )
        return cur

    def save(self, store: FeatureStore) -> None:
        """Write ``clusters/<run>/curation.json`` atomically."""
        store.write_run_json(self.run, DOCUMENT, self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The versioned document (see :meth:`from_json`)."""
        overrides = {}
        for sid in sorted(self._overrides):
            items = sorted(self._overrides[sid].items())
            overrides[sid] = {
                "rows": [r for (r, _), _ in items],
                "cols": [c for (_, c), _ in items],
                "class": [name for _, name in items],
            }
        return {
            "format": FORMAT,
            "version": VERSION,
            "run": self.run,
            "run_created": self.run_created,
            "k": self.k,
            "clusters": [
                {"cluster": c, "name": self._names[c], "selected": self._selected[c]}
                for c in range(self.k)
            ],
            "overrides": overrides,
            "history": list(self.history),
        }

    @classmethod
    def from_json(cls, doc: Any, where: str = "curation") -> Curation:
        """Inverse of :meth:`to_json`; ``StoreError`` naming ``where`` for anything malformed.

        Document (version 1)::

            {"format": "histocluster-curation", "version": 1, "run": "k8", "run_created": "...",
             "k": 8, "clusters": [{"cluster": 0, "name": "ink" | null, "selected": bool}, ...],
             "overrides": {"<slide_id>": {"rows": [...], "cols": [...], "class": ["ink" | null, ...]}},
             "history": ["'ink' -> cluster 5", ...]}
        """
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise StoreError(f"{where}: not a histocluster curation — delete it to start afresh")
        version = doc.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise StoreError(
                f"{where}: curation version {version!r}, this histocluster reads up to "
                f"{VERSION} — update histocluster"
            )
        try:
            k = int(doc["k"])
            names: list[str | None] = [None] * k
            selected = [False] * k
            for entry in doc.get("clusters", []):
                c = int(entry["cluster"])
                if not 0 <= c < k:
                    raise ValueError(f"cluster {c} outside 0..{k - 1}")
                names[c] = entry.get("name")
                selected[c] = bool(entry.get("selected", False))
            overrides: dict[TileKey, str | None] = {}
            for sid, tiles in dict(doc.get("overrides", {})).items():
                rows, cols, classes = tiles["rows"], tiles["cols"], tiles["class"]
                if not len(rows) == len(cols) == len(classes):
                    raise ValueError(f"overrides of {sid!r}: rows, cols and class differ in length")
                for r, c, name in zip(rows, cols, classes, strict=True):
                    overrides[(str(sid), int(r), int(c))] = name
            return cls(
                str(doc["run"]),
                k,
                run_created=doc.get("run_created"),
                names=names,
                selected=selected,
                overrides=overrides,
                history=[str(h) for h in doc.get("history", [])],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{where}: damaged curation ({e}) — delete it to start afresh") from e

    @classmethod
    def from_classes(
        cls,
        store: FeatureStore,
        run: str,
        classes: Mapping[str, Iterable[int]],
        select: bool = True,
    ) -> Curation:
        """A curation naming clusters from ``{"ink": [2, 5], "tissue": [0, 1, 3]}`` (a script's spec).

        A class may hold several clusters; a cluster in two classes is refused.
        """
        cur = cls.for_run(store, run)
        for name, clusters in classes.items():
            for c in clusters:
                if cur.name_of(c) is not None:
                    raise HistoclusterError(
                        f"cluster {c} is given to both {cur.name_of(c)!r} and {name!r} — give it one class"
                    )
                cur.name_cluster(c, name)
                cur.select(c, select)
        return cur

    def copy(self) -> Curation:
        """An independent copy without the observers."""
        return Curation.from_json(self.to_json())

    def replace_with(self, other: Curation) -> None:
        """Take over ``other``'s run, names, selection and overrides (after a carry-over), keeping observers."""
        self.run, self.k, self.run_created = other.run, other.k, other.run_created
        self._names = list(other._names)
        self._selected = list(other._selected)
        self._overrides = {sid: dict(t) for sid, t in other._overrides.items()}
        self.history = list(other.history)
        self._emit(Change("replace"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Curation) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        named = sum(n is not None for n in self._names)
        return (
            f"Curation(run={self.run!r}, k={self.k}, named={named}, "
            f"selected={sum(self._selected)}, overrides={self.n_overrides()})"
        )

    # ------------------------------------------------------------------ observers

    def connect(self, callback: Callable[[Change], None]) -> Callable[[Change], None]:
        """Call ``callback(change)`` after every edit; returns it (usable as a decorator)."""
        self._observers.append(callback)
        return callback

    def disconnect(self, callback: Callable[[Change], None]) -> None:
        """Stop calling ``callback`` (no error if it was not connected)."""
        if callback in self._observers:
            self._observers.remove(callback)

    def _emit(self, change: Change) -> None:
        for callback in list(self._observers):
            callback(change)

    # ------------------------------------------------------------------ clusters

    def _cluster(self, c: int) -> int:
        c = int(c)
        if not 0 <= c < self.k:
            raise IndexError(f"cluster {c} outside 0..{self.k - 1} of run {self.run!r}")
        return c

    @property
    def names(self) -> tuple[str | None, ...]:
        """(k,) class name of each cluster, ``None`` where unnamed."""
        return tuple(self._names)

    @property
    def selected(self) -> tuple[bool, ...]:
        """(k,) whether each cluster is selected for export."""
        return tuple(self._selected)

    def name_of(self, c: int) -> str | None:
        return self._names[self._cluster(c)]

    def is_selected(self, c: int) -> bool:
        return self._selected[self._cluster(c)]

    def name_cluster(self, c: int, name: str | None) -> None:
        """Give cluster ``c`` the class ``name`` (``None`` or blank: no name). Several clusters may share one."""
        c, name = self._cluster(c), check_name(name)
        if self._names[c] != name:
            self._names[c] = name
            self._emit(Change("name", cluster=c))

    def select(self, c: int, on: bool = True) -> None:
        """Select cluster ``c`` for export (or not). An unnamed selected cluster exports nothing."""
        c = self._cluster(c)
        if self._selected[c] != bool(on):
            self._selected[c] = bool(on)
            self._emit(Change("select", cluster=c))

    def clusters_of(self, name: str) -> list[int]:
        """The clusters named ``name``."""
        return [c for c, n in enumerate(self._names) if n == name]

    def classes(self) -> list[str]:
        """Every class: cluster names in cluster order, then classes made by overrides alone (sorted)."""
        out = list(dict.fromkeys(n for n in self._names if n is not None))
        extra = {n for t in self._overrides.values() for n in t.values() if n is not None}
        return out + sorted(extra - set(out))

    def exported_classes(self) -> list[str]:
        """Classes export writes: names of selected clusters, and classes that name no cluster."""
        named = {n for n in self._names if n is not None}
        chosen = {n for n, on in zip(self._names, self._selected, strict=True) if on and n}
        return [n for n in self.classes() if n in chosen or n not in named]

    # ------------------------------------------------------------------ overrides

    def override_tile(self, slide_id: str, row: int, col: int, name: str | None) -> None:
        """Move one tile to class ``name``, or exclude it (``None``)."""
        self.override_tiles(slide_id, [row], [col], name)

    def override_tiles(
        self, slide_id: str, rows: Sequence[int], cols: Sequence[int], name: str | None
    ) -> None:
        """Move tiles ``rows``, ``cols`` (N,) of one slide to class ``name``, or exclude them (``None``); one event."""
        name = check_name(name)
        rows, cols = [int(r) for r in rows], [int(c) for c in cols]
        if len(rows) != len(cols):
            raise ValueError(f"rows and cols differ in length ({len(rows)} vs {len(cols)})")
        if any(r < 0 for r in rows) or any(c < 0 for c in cols):
            raise ValueError("tile rows and cols must be >= 0")
        tiles = self._overrides.setdefault(str(slide_id), {})
        for r, c in zip(rows, cols, strict=True):
            tiles[(r, c)] = name
        if rows:
            self._emit(Change("override", slide_id=slide_id, rows=tuple(rows), cols=tuple(cols)))

    def clear_override(self, slide_id: str, row: int, col: int) -> None:
        """Give one tile back to its cluster's name."""
        self.clear_overrides(slide_id, [row], [col])

    def clear_overrides(
        self,
        slide_id: str,
        rows: Sequence[int] | None = None,
        cols: Sequence[int] | None = None,
    ) -> None:
        """Drop the overrides of tiles ``rows``, ``cols`` of one slide (all of the slide's when None)."""
        tiles = self._overrides.get(slide_id, {})
        if rows is None or cols is None:
            keys = list(tiles)
        else:
            keys = [(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
        gone = [key for key in keys if tiles.pop(key, _ABSENT) is not _ABSENT]
        if not tiles:
            self._overrides.pop(slide_id, None)
        if gone:
            self._emit(
                Change(
                    "override",
                    slide_id=slide_id,
                    rows=tuple(r for r, _ in gone),
                    cols=tuple(c for _, c in gone),
                )
            )

    def has_override(self, slide_id: str, row: int, col: int) -> bool:
        return (int(row), int(col)) in self._overrides.get(slide_id, {})

    def overrides(self, slide_id: str | None = None) -> dict[TileKey, str | None]:
        """``{(slide_id, row, col): class or None (excluded)}``, of one slide or all."""
        sids = [slide_id] if slide_id is not None else sorted(self._overrides)
        return {
            (sid, r, c): name
            for sid in sids
            for (r, c), name in sorted(self._overrides.get(sid, {}).items())
        }

    def override_slides(self) -> list[str]:
        """Slides that have overrides."""
        return sorted(self._overrides)

    def n_overrides(self) -> int:
        return sum(len(t) for t in self._overrides.values())

    # ------------------------------------------------------------------ the rule

    def class_of(self, slide_id: str, row: int, col: int, label: int) -> str | None:
        """The class of one tile whose cluster in the run is ``label`` (-1: none); see the module doc."""
        tiles = self._overrides.get(slide_id, {})
        if (int(row), int(col)) in tiles:
            return tiles[(int(row), int(col))]
        return self._names[self._cluster(label)] if label >= 0 else None

    def class_map(
        self,
        slide_id: str,
        labels: np.ndarray,
        classes: Sequence[str] | None = None,
        selected_only: bool = False,
    ) -> np.ndarray:
        """(rows, cols) int16 index into ``classes`` (default :meth:`classes`) of each tile, -1 for none.

        Args:
            labels: (rows, cols) int cluster of each tile in the run, -1 outside tissue.
            selected_only: apply the export rule (selected clusters, exported classes).
        """
        labels = np.asarray(labels)
        classes = list(self.classes() if classes is None else classes)
        index = {n: i for i, n in enumerate(classes)}
        exported = set(self.exported_classes()) if selected_only else None
        per_cluster = np.full(self.k + 1, -1, np.int16)  # last entry: label -1
        for c, name in enumerate(self._names):
            if name in index and (not selected_only or self._selected[c]):
                per_cluster[c] = index[name]
        if labels.size and (labels.min() < -1 or labels.max() >= self.k):
            raise ValueError(f"labels of {slide_id!r} must lie in [-1, {self.k - 1}]")
        out = per_cluster[np.where(labels < 0, self.k, labels)]
        for (r, c), name in self._overrides.get(slide_id, {}).items():
            if r < labels.shape[0] and c < labels.shape[1]:
                keep = name in index and (exported is None or name in exported)
                out[r, c] = index[name] if keep else -1
        return out

    def assignments(self, store: FeatureStore, selected_only: bool = True) -> Iterator[ClassTiles]:
        """The tiles of each class, slide by slide, as export must write them.

        Covers the run's slides and the store's slides that only have overrides; overrides
        outside a slide's grid are ignored (:meth:`problems` lists them). Yields one
        :class:`ClassTiles` per (slide, class) holding at least one tile, slides sorted,
        classes in :meth:`classes` order; ``selected_only`` applies the export rule.
        """
        classes = self.classes()
        run_slides = set(_run_slides(store, self.run))
        known = set(store.slide_ids())
        for sid in sorted(run_slides | (set(self._overrides) & known)):
            if sid in run_slides:
                labels = store.read_cluster_labels(self.run, sid)
            else:
                labels = np.full(store.slide(sid).shape, -1, np.int16)
            cmap = self.class_map(sid, labels, classes, selected_only)
            over = np.zeros(labels.shape, bool)
            for r, c in self._overrides.get(sid, {}):
                if r < labels.shape[0] and c < labels.shape[1]:
                    over[r, c] = True
            for i, name in enumerate(classes):
                rows, cols = np.nonzero(cmap == i)
                if len(rows):
                    yield ClassTiles(
                        sid,
                        name,
                        rows.astype(np.int64),
                        cols.astype(np.int64),
                        labels[rows, cols].astype(np.int16),
                        over[rows, cols],
                    )

    def counts(self, store: FeatureStore, selected_only: bool = False) -> dict[str, dict[str, int]]:
        """``{class: {slide_id: tiles}}`` under the rule (for the widget's table and export reports)."""
        out: dict[str, dict[str, int]] = {n: {} for n in self.classes()}
        for part in self.assignments(store, selected_only):
            out[part.class_name][part.slide_id] = len(part.rows)
        return out

    def problems(self, store: FeatureStore) -> list[str]:
        """Lines naming overrides that point at no tile of the store (unknown slide, outside its grid)."""
        out = []
        known = set(store.slide_ids())
        for sid, tiles in sorted(self._overrides.items()):
            if sid not in known:
                out.append(f"{len(tiles)} override(s) on slide {sid!r}, which {store.path} lacks")
                continue
            rows, cols = store.slide(sid).shape
            bad = sum(1 for r, c in tiles if r >= rows or c >= cols)
            if bad:
                out.append(f"{bad} override(s) on slide {sid!r} outside its {rows} x {cols} grid")
        return out


def _run_identity(store: FeatureStore, run: str) -> tuple[dict[str, Any], np.ndarray]:
    """(attrs, centroids (k, dim)) of a run, without reading its labels."""
    run_data = store.read_cluster_run(run, slide_ids=[])
    return run_data.attrs, run_data.centroids


def _run_slides(store: FeatureStore, run: str) -> list[str]:
    """Slides that have labels in ``run``."""
    attrs, _ = _run_identity(store, run)
    return [str(s) for s in attrs.get("slides", [])]
