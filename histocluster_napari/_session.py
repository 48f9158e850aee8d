"""What the HistoCluster widget asks of the engine, as plain functions run in a worker thread.

No Qt here: each function takes a ``progress(stage, done, total)`` callback, which may raise
``Cancelled`` to stop the work at the next report (features encoded so far stay in the store,
so the next Cluster resumes). Everything heavy is an ``engine`` call.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine.errors import HistoclusterError
from engine.slide import open_slide, slide_id
from histocluster_napari._overlay import GridGeometry

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total); may raise ``Cancelled``."""

RUN_PREFIX = "napari-k"
"""The widget's cluster runs are named ``napari-k<k>`` and replaced when re-run."""
N_EXEMPLARS = 3


class Cancelled(Exception):
    """The user pressed Cancel."""


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def cache_dir() -> Path:
    """``$HISTOCLUSTER_CACHE`` or ``$XDG_CACHE_HOME/histocluster`` (``~/.cache/histocluster``)."""
    if os.environ.get("HISTOCLUSTER_CACHE"):
        return Path(os.environ["HISTOCLUSTER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "histocluster"


def encoder_key(spec: str) -> str:
    """What identifies an encoder without loading it: a name, or a file's path, size and mtime."""
    path = Path(spec).expanduser()
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return spec


@dataclass(frozen=True)
class ClusterJob:
    """The inputs of one Cluster click."""

    slide_path: Path
    slide_mpp: float | None
    encoder: str
    tile_px: int
    target_mpp: float
    k: int
    store: Path | None = None

    def with_k(self, k: int) -> ClusterJob:
        return replace(self, k=int(k))

    @property
    def slide_id(self) -> str:
        return slide_id(self.slide_path)

    def store_path(self) -> Path:
        """The store given, or ``<cache>/stores/<slide_id>-<hash>.zarr`` keyed by slide, encoder, tiling."""
        if self.store is not None:
            return self.store
        key = json.dumps(
            {
                "slide": str(Path(self.slide_path).resolve()),
                "slide_mpp": self.slide_mpp,
                "encoder": encoder_key(self.encoder),
                "tile_px": self.tile_px,
                "target_mpp": self.target_mpp,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return cache_dir() / "stores" / f"{self.slide_id}-{digest}.zarr"


@dataclass
class ClusterView:
    """A clustering as the widget shows it."""

    job: ClusterJob
    store_path: Path
    run: str
    slide_id: str
    slide_path: Path
    labels: np.ndarray  # (rows, cols) int16, -1 outside tissue
    counts: np.ndarray  # (k,) int64 tiles per cluster in this slide
    exemplars: list[list[np.ndarray]]  # per cluster, up to 3 (tile_px, tile_px, 3) uint8 tiles
    geometry: GridGeometry
    n_encoded: int = 0

    @property
    def k(self) -> int:
        return len(self.counts)


@dataclass
class ExportReport:
    """Patches written per class name, and where."""

    out_dir: Path
    per_class: dict[str, int]
    warnings: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_class.values())


# ---------------------------------------------------------------------- clustering


def run_clustering(job: ClusterJob, progress: Progress = _no_progress) -> ClusterView:
    """Encode the slide's missing tiles into the job's store, then K-means with ``job.k``."""
    n_encoded = ensure_features(job, progress)
    view = recluster_store(job, job.store_path(), progress)
    view.n_encoded = n_encoded
    return view


def recluster(view: ClusterView, k: int, progress: Progress = _no_progress) -> ClusterView:
    """K-means again with another ``k`` from the features already stored (no encoding)."""
    return recluster_store(view.job.with_k(k), view.store_path, progress)


def ensure_features(job: ClusterJob, progress: Progress = _no_progress) -> int:
    """Encode the tissue tiles of ``job``'s slide that its store lacks; returns how many were encoded.

    Nothing is loaded or encoded when the store already holds every tissue tile of the slide
    for this encoder and tiling (a second Cluster, or a change of k).
    """
    from engine import extract

    store_path = job.store_path()
    if features_complete(job, store_path):
        return 0
    progress("encoding tiles", 0, 0)
    store_path.parent.mkdir(parents=True, exist_ok=True)
    cfg = extract.ExtractConfig(
        slides=[str(job.slide_path)],
        out=str(store_path),
        encoder=job.encoder,
        tile_px=job.tile_px,
        mpp=job.target_mpp,
        slide_mpp=None if job.slide_mpp is None else repr(float(job.slide_mpp)),
        workers=0,  # no forked reader processes inside the GUI process
        batch_size=gui_batch_size(),
        quiet=True,
    )
    # ``progress`` raising Cancelled stops the run once what was encoded is in the store.
    summary = extract.run(cfg, progress=lambda done, total: progress("encoding tiles", done, total))
    if summary.failures:
        raise HistoclusterError(summary.failures[0]["error"])
    return int(summary.tiles)


def gui_batch_size() -> int:
    """Tiles per batch in the GUI: small on CPU, so progress and Cancel respond within a second."""
    import torch

    return 64 if torch.cuda.is_available() else 16


def count_done(store_path: Path, slide: str) -> tuple[int, int]:
    """(encoded, to encode) tissue tiles of ``slide`` in the store at ``store_path``."""
    from engine.store import FeatureStore

    sf = FeatureStore.open(store_path).slide(slide)
    selected = sf.selected
    return int((selected & np.asarray(sf.done[...])).sum()), int(selected.sum())


def features_complete(job: ClusterJob, store_path: Path) -> bool:
    """True when ``store_path`` holds every tissue tile of the job's slide, encoder and tiling."""
    from engine.store import FeatureStore, file_fingerprint

    if not (store_path / "zarr.json").is_file():
        return False
    try:
        store = FeatureStore.open(store_path)
        if job.slide_id not in store:
            return False
        tiling = store.tiling
        if tiling.tile_px != job.tile_px or tiling.stride != job.tile_px:
            return False
        if not np.isclose(tiling.target_mpp, job.target_mpp, rtol=1e-9):
            return False
        if not _same_encoder(store.encoder.to_attrs(), job.encoder):
            return False
        sf = store.slide(job.slide_id)
        attrs = sf.attrs
        if attrs.get("fingerprint") != file_fingerprint(job.slide_path):
            return False
        if job.slide_mpp is not None and not np.allclose(attrs["mpp"], job.slide_mpp, rtol=1e-9):
            return False
        return not sf.pending().any()
    except (HistoclusterError, OSError, KeyError, ValueError):
        return False


def _same_encoder(stored: dict, spec: str) -> bool:
    path = Path(spec).expanduser()
    if path.is_file():
        if not stored.get("sha256"):
            return False
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest() == stored["sha256"]
    return not stored.get("sha256") and stored.get("spec") == spec


def recluster_store(
    job: ClusterJob, store_path: Path, progress: Progress = _no_progress
) -> ClusterView:
    """Cluster the job's slide in the store at ``store_path`` and gather what the table shows."""
    from engine.cluster import ClusterConfig, run_clustering
    from engine.store import FeatureStore

    sid = job.slide_id
    progress("clustering", 0, 1)
    store = FeatureStore.open(store_path, mode="r+")
    cfg = ClusterConfig(
        store=store_path,
        k=job.k,
        name=f"{RUN_PREFIX}{job.k}",
        slides=[sid],
        exemplars=N_EXEMPLARS,
        overlays=False,
        overwrite=True,
        quiet=True,
    )
    result = run_clustering(store, cfg)
    progress("clustering", 1, 1)
    sf = store.slide(sid)
    tiling = store.tiling
    exemplars = read_exemplars(
        Path(sf.source_path),
        tuple(sf.attrs["mpp"]),  # type: ignore[arg-type]
        [[(e.l0_x, e.l0_y) for e in row] for row in result.exemplars],
        tiling.target_mpp,
        tiling.tile_px,
        progress,
    )
    return ClusterView(
        job=job,
        store_path=store_path,
        run=result.run,
        slide_id=sid,
        slide_path=Path(job.slide_path),
        labels=result.labels[sid],
        counts=np.asarray(result.counts[sid], dtype=np.int64),
        exemplars=exemplars,
        geometry=GridGeometry.from_store_attrs(sf.attrs),
    )


def read_exemplars(
    path: Path,
    mpp: tuple[float, float],
    origins: Sequence[Sequence[tuple[int, int]]],
    target_mpp: float,
    tile_px: int,
    progress: Progress = _no_progress,
) -> list[list[np.ndarray]]:
    """The exemplar tiles (tile_px, tile_px, 3) uint8, per cluster, read from the slide."""
    total = sum(len(row) for row in origins)
    out: list[list[np.ndarray]] = []
    done = 0
    with open_slide(path, mpp) as slide:
        for row in origins:
            tiles = []
            for xy in row:
                tiles.append(slide.read_tile_at_mpp(xy, target_mpp, tile_px))
                done += 1
            out.append(tiles)
            progress("exemplars", done, total)
    return out


# ---------------------------------------------------------------------- similar tiles


def similar_tiles(
    view: ClusterView, tile: tuple[int, int], top: int
) -> list[tuple[int, int, float]]:
    """(row, col, cosine similarity) of this slide's ``top`` tiles most like ``tile`` (itself excluded)."""
    from engine.query import similar_tiles as query
    from engine.query import tile_vector
    from engine.store import FeatureStore

    store = FeatureStore.open(view.store_path)
    vector = tile_vector(store, view.slide_id, int(tile[0]), int(tile[1]))
    hits = query(store, vector, top, [view.slide_id], exclude=[(view.slide_id, *tile)])
    return [(h.row, h.col, h.similarity) for h in hits]


# ---------------------------------------------------------------------- export


def check_names(names: Sequence[str]) -> str | None:
    """Why these class names cannot be exported (None when they can): ``engine.export``'s rules."""
    from engine.export import check_class_names

    try:
        check_class_names(list(names))
    except ValueError as e:
        return str(e)
    return None


def export_clusters(
    view: ClusterView,
    clusters: Sequence[int],
    names: Sequence[str],
    out_dir: Path,
    progress: Progress = _no_progress,
) -> ExportReport:
    """Export the tiles of ``clusters`` as classes ``names`` into ``out_dir`` via ``engine.export``.

    Folders per class, ``manifest.csv``, ``export.json`` and a GeoJSON per slide.
    """
    from engine.export import ExportConfig, run_export
    from engine.store import FeatureStore

    progress("exporting", 0, 1)
    store = FeatureStore.open(view.store_path)
    cfg = ExportConfig(
        store=view.store_path,
        clusters=[int(c) for c in clusters],
        out=Path(out_dir),
        run=view.run,
        names=list(names),
        slides=[view.slide_id],
        geojson=True,
        quiet=True,
    )
    result = run_export(store, cfg)
    progress("exporting", 1, 1)
    return ExportReport(Path(out_dir), dict(result.per_class), list(result.warnings))


__all__ = [
    "Cancelled",
    "ClusterJob",
    "ClusterView",
    "ExportReport",
    "HistoclusterError",
    "cache_dir",
    "check_names",
    "export_clusters",
    "recluster",
    "run_clustering",
    "similar_tiles",
]
