"""What the HistoCluster widget asks of the engine, as plain functions run in a worker thread.

No Qt here: each function takes an ``engine.progress`` callback ``progress(stage, done, total)``,
which may raise ``Cancelled`` to stop the work at the next report (features encoded so far stay
in the store, so the next Cluster resumes). Everything heavy is an ``engine`` call, and whether a
store can serve a request is ``FeatureStore.coverage``'s decision, the same as the CLI's.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from engine import cluster as engine_cluster
from engine import export as engine_export
from engine import extract as engine_extract
from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError
from engine.files import cache_dir
from engine.models import load_encoder
from engine.progress import Cancelled, Progress, no_progress
from engine.query import similar_tiles as query_similar
from engine.query import tile_vector
from engine.slide import open_slide, slide_id
from engine.store import Coverage, FeatureStore
from engine.tiling import Tiling
from histocluster_napari._overlay import GridGeometry

RUN_PREFIX = "napari-k"
"""The widget's cluster runs are named ``napari-k<k>`` and replaced when re-run."""
N_EXEMPLARS = 3


# ---------------------------------------------------------------------- encoder identity


def _spec_key(spec: str) -> tuple[str, int, int]:
    """What a spec's identity depends on: a name, or a file's resolved path, size and mtime."""
    path = Path(spec).expanduser()
    if path.is_file():
        st = path.stat()
        return str(path.resolve()), st.st_size, st.st_mtime_ns
    return spec, -1, -1


class EncoderIds:
    """The ``EncoderId`` of each encoder spec, loaded once per spec and file state (thread-safe).

    ``load_encoder(spec).identity()`` costs a model load (and, once per file content, a sha256 of
    the checkpoint, cached by ``engine.files.sha256_file``); a second Cluster click reuses it.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[str, int, int], EncoderId] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, spec: str) -> EncoderId:
        key = _spec_key(spec)
        with self._lock:
            cached = self._ids.get(key)
        if cached is not None:
            return cached
        identity = load_encoder(spec).identity()
        with self._lock:
            self._ids[key] = identity
            self.loads += 1
        return identity


ENCODER_IDS = EncoderIds()
"""The GUI process's cache of encoder identities."""


# ---------------------------------------------------------------------- jobs and views


@dataclass(frozen=True)
class ClusterJob:
    """The inputs of one Cluster click."""

    slide_path: Path
    slide_mpp: float | None
    encoder: str
    tiling: Tiling
    k: int
    store: Path | None = None

    def with_k(self, k: int) -> ClusterJob:
        return replace(self, k=int(k))

    @property
    def slide_id(self) -> str:
        return slide_id(self.slide_path)

    @property
    def is_cache(self) -> bool:
        """True when the features live in the widget's cache (no store was given)."""
        return self.store is None

    def store_path(self) -> Path:
        """The store given, or ``<cache>/stores/<slide_id>-<hash>.zarr``.

        The hash covers the slide, its given um/px, the encoder spec and the whole tiling
        (tissue method and minimum tissue fraction included), so different requests get
        different cache stores; whether one can be reused is ``FeatureStore.coverage``'s call.
        """
        if self.store is not None:
            return self.store
        key = json.dumps(
            {
                "slide": str(Path(self.slide_path).resolve()),
                "slide_mpp": self.slide_mpp,
                "encoder": _spec_key(self.encoder)[0],
                "tiling": self.tiling.to_attrs(),
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return cache_dir() / "stores" / f"{self.slide_id}-{digest}.zarr"

    def coverage(self, encoders: EncoderIds = ENCODER_IDS) -> Coverage:
        """What the job's store holds of its slide, encoder and tiling (``FeatureStore.coverage``)."""
        return FeatureStore.coverage(
            self.store_path(), self.slide_path, encoders.get(self.encoder), self.tiling
        )


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


def run_clustering(job: ClusterJob, progress: Progress = no_progress) -> ClusterView:
    """Encode the slide's missing tiles into the job's store, then K-means with ``job.k``."""
    n_encoded = ensure_features(job, progress)
    view = recluster_store(job, job.store_path(), progress)
    view.n_encoded = n_encoded
    return view


def recluster(view: ClusterView, k: int, progress: Progress = no_progress) -> ClusterView:
    """K-means again with another ``k`` from the features already stored (no encoding)."""
    return recluster_store(view.job.with_k(k), view.store_path, progress)


def ensure_features(job: ClusterJob, progress: Progress = no_progress) -> int:
    """Encode the tissue tiles of ``job``'s slide that its store lacks; returns how many were encoded.

    Nothing is encoded when ``FeatureStore.coverage`` says the store already holds every
    tissue tile of the slide for this encoder and tiling (a second Cluster, a change of k). A
    cache store that cannot serve the request (its encoder file or slide changed) is replaced; a
    store the user named is never replaced: its problem is reported.
    """
    progress("checking the feature store", 0, 1)
    coverage = job.coverage()
    if coverage.complete:
        return 0
    overwrite = False
    if coverage.problem:
        if not job.is_cache:
            reason = coverage.problem.split(" — ")[0]
            raise HistoclusterError(
                f"{reason} — choose another 'feature store' (or leave it empty for the cache)"
            )
        overwrite = True
    store_path = job.store_path()
    store_path.parent.mkdir(parents=True, exist_ok=True)
    cfg = engine_extract.ExtractConfig(
        slides=[str(job.slide_path)],
        out=str(store_path),
        encoder=job.encoder,
        tile_px=job.tiling.tile_px,
        mpp=job.tiling.target_mpp,
        stride_px=job.tiling.stride,
        tissue=job.tiling.tissue_method,
        min_tissue=job.tiling.min_tissue,
        slide_mpp=None if job.slide_mpp is None else repr(float(job.slide_mpp)),
        workers=0,  # no forked reader processes inside the GUI process
        batch_size=gui_batch_size(),
        overwrite=overwrite,
        quiet=True,
    )
    # ``progress`` raising Cancelled stops the run once what was encoded is in the store.
    summary = engine_extract.run(cfg, progress=_stage_progress(progress, "encoding tiles"))
    if summary.failures:
        raise HistoclusterError(summary.failures[0]["error"])
    return int(summary.tiles)


def _stage_progress(progress: Progress, default_stage: str):
    """The engine's progress callback; accepts ``(done, total)`` from runs not yet on the protocol."""

    def report(*args: object) -> None:
        if len(args) == 2:
            progress(default_stage, int(args[0]), int(args[1]))  # type: ignore[arg-type]
        else:
            progress(str(args[0]), int(args[1]), int(args[2]))  # type: ignore[arg-type]

    return report


def gui_batch_size() -> int:
    """Tiles per batch in the GUI: small on CPU, so progress and Cancel respond within a second."""
    import torch

    return 64 if torch.cuda.is_available() else 16


def count_done(store_path: Path, slide: str) -> tuple[int, int]:
    """(encoded, to encode) tissue tiles of ``slide`` in the store at ``store_path``."""
    sf = FeatureStore.open(store_path).slide(slide)
    selected = sf.selected
    return int((selected & sf.done).sum()), int(selected.sum())


def recluster_store(
    job: ClusterJob, store_path: Path, progress: Progress = no_progress
) -> ClusterView:
    """Cluster the job's slide in the store at ``store_path`` and gather what the table shows."""
    sid = job.slide_id
    progress("clustering", 0, 1)
    store = FeatureStore.open(store_path, mode="r+")
    cfg = engine_cluster.ClusterConfig(
        store=store_path,
        k=job.k,
        name=f"{RUN_PREFIX}{job.k}",
        slides=[sid],
        exemplars=N_EXEMPLARS,
        overlays=False,
        overwrite=True,
        quiet=True,
    )
    result = engine_cluster.run_clustering(store, cfg)
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
    progress: Progress = no_progress,
) -> list[list[np.ndarray]]:
    """The exemplar tiles (tile_px, tile_px, 3) uint8, per cluster, read from the slide."""
    total = sum(len(row) for row in origins)
    out: list[list[np.ndarray]] = []
    done = 0
    progress("exemplars", 0, total)
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
    store = FeatureStore.open(view.store_path)
    vector = tile_vector(store, view.slide_id, int(tile[0]), int(tile[1]))
    hits = query_similar(store, vector, top, [view.slide_id], exclude=[(view.slide_id, *tile)])
    return [(h.row, h.col, h.similarity) for h in hits]


# ---------------------------------------------------------------------- export


def check_names(names: Sequence[str]) -> str | None:
    """Why these class names cannot be exported (None when they can): ``engine.export``'s rules."""
    try:
        engine_export.check_class_names(list(names))
    except (ValueError, HistoclusterError) as e:
        return str(e)
    return None


def export_clusters(
    view: ClusterView,
    clusters: Sequence[int],
    names: Sequence[str],
    out_dir: Path,
    progress: Progress = no_progress,
) -> ExportReport:
    """Export the tiles of ``clusters`` as classes ``names`` into ``out_dir`` via ``engine.export``.

    Folders per class, ``manifest.csv``, ``export.json`` and a GeoJSON per slide.
    """
    progress("exporting", 0, 1)
    store = FeatureStore.open(view.store_path)
    cfg = engine_export.ExportConfig(
        store=view.store_path,
        clusters=[int(c) for c in clusters],
        out=Path(out_dir),
        run=view.run,
        names=list(names),
        slides=[view.slide_id],
        geojson=True,
        quiet=True,
    )
    result = engine_export.run_export(store, cfg)
    progress("exporting", 1, 1)
    return ExportReport(Path(out_dir), dict(result.per_class), list(result.warnings))


__all__ = [
    "ENCODER_IDS",
    "Cancelled",
    "ClusterJob",
    "ClusterView",
    "EncoderIds",
    "ExportReport",
    "HistoclusterError",
    "check_names",
    "export_clusters",
    "recluster",
    "run_clustering",
    "similar_tiles",
]
