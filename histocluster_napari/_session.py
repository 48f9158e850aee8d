"""What the HistoCluster widget asks of the engine, as plain functions run in a worker thread.

No Qt here: each function takes an ``engine.progress`` callback ``progress(stage, done, total)``,
which may raise ``Cancelled`` to stop the work at the next report (features encoded so far stay
in the store, so the next Cluster resumes; a cancelled K-means leaves no new run; a cancelled
export leaves only whole files, all listed in its manifest). Everything heavy is an ``engine``
call: whether a store can serve a request is ``FeatureStore.coverage``'s decision (the CLI's),
the names of a new run come from ``engine.curation_match.carry_over``, and export applies the
run's saved ``engine.curation.Curation`` exactly as ``python -m engine.export`` does.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from engine import cluster as engine_cluster
from engine import export as engine_export
from engine import extract as engine_extract
from engine.cluster_features import ClusterFeatures
from engine.curation import Curation
from engine.curation_match import CarryOver, carry_over
from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError, StoreError
from engine.files import cache_dir
from engine.models import load_encoder
from engine.progress import Cancelled, Progress, no_progress
from engine.query import similar_tiles as query_similar
from engine.query import tile_vector
from engine.slide import SlideCache, slide_id
from engine.store import ClusterRun, Coverage, FeatureStore
from engine.tiling import Tiling
from histocluster_napari._overlay import GridGeometry

RUN_PREFIX = "napari-k"
"""The widget's cluster runs are named ``napari-k<k>``, ``napari-k<k>-2``, ... (never overwritten,
so the run a curation is carried from is still there to compare with)."""
N_EXEMPLARS = 3
STAGES = {
    "checking": "checking the feature store",
    "tissue": "finding tissue",
    "encode": "encoding tiles",
    "features": "reading features",
    "kmeans": "K-means",
    "assign": "assigning tiles",
    "exemplars": "reading exemplars",
    "overlays": "drawing overlays",
    "plan": "choosing tiles",
    "export": "exporting tiles",
    "gallery": "gallery",
}
"""What the progress bar says for each engine stage."""

FEATURES = ClusterFeatures()
"""The session's normalised features, kept across k changes (re-read when the store changes;
one clustering at a time: the widget runs one worker)."""


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


# ---------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class ClusterJob:
    """The inputs of one Cluster click: the slides (one, or a cohort), encoder, tiling, k."""

    slides: tuple[Path, ...]
    slide_mpp: float | None
    encoder: str
    tiling: Tiling
    k: int
    store: Path | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "slides", tuple(Path(p) for p in self.slides))
        if not self.slides:
            raise HistoclusterError("no slides to cluster — open a slide or a folder of slides")

    def with_k(self, k: int) -> ClusterJob:
        return replace(self, k=int(k))

    @property
    def slide_ids(self) -> list[str]:
        return [slide_id(p) for p in self.slides]

    @property
    def is_cache(self) -> bool:
        """True when the features live in the widget's cache (no store was given)."""
        return self.store is None

    def store_path(self) -> Path:
        """The store given, or ``<cache>/stores/<first slide id>[+n]-<hash>.zarr``.

        The hash covers the slides, their given um/px, the encoder spec and the whole tiling
        (tissue method and minimum tissue fraction included), so different requests get
        different cache stores; whether one can be reused is ``FeatureStore.coverage``'s call.
        """
        if self.store is not None:
            return self.store
        key = json.dumps(
            {
                "slides": sorted(str(Path(p).resolve()) for p in self.slides),
                "slide_mpp": self.slide_mpp,
                "encoder": _spec_key(self.encoder)[0],
                "tiling": self.tiling.to_attrs(),
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        more = f"+{len(self.slides) - 1}" if len(self.slides) > 1 else ""
        return cache_dir() / "stores" / f"{self.slide_ids[0]}{more}-{digest}.zarr"

    def coverage(self, slide: Path, encoders: EncoderIds = ENCODER_IDS) -> Coverage:
        """What the job's store holds of ``slide`` with this encoder and tiling."""
        return FeatureStore.coverage(
            self.store_path(),
            slide,
            encoders.get(self.encoder),
            self.tiling,
            slide_mpp=self.slide_mpp,
        )


@dataclass
class FeatureReport:
    """What ``ensure_features`` did: tiles encoded now, one line per slide that failed or has
    unreadable tiles, and the unreadable tiles (recorded in the store, not an error)."""

    encoded: int = 0
    failures: list[str] = field(default_factory=list)
    unreadable: int = 0


def ensure_features(job: ClusterJob, *, progress: Progress = no_progress) -> FeatureReport:
    """Encode the tissue tiles of the job's slides that its store lacks (``engine.extract``).

    Slides that ``FeatureStore.coverage`` calls complete are not touched. A cache store that
    cannot serve the request (its encoder file or a slide changed) is replaced; a store the
    user named is never replaced: its problem is reported. Slides that cannot be read are listed
    in ``failures`` (the others are encoded); when none can be read at all, that is an error. A
    slide with some unreadable tiles is not: they are recorded in the store as failed (shown
    hatched), counted in ``unreadable`` and named in ``failures``.
    """
    progress("checking", 0, len(job.slides))
    todo: list[Path] = []
    overwrite = False
    for i, path in enumerate(job.slides):
        cov = job.coverage(path)
        if cov.problem:
            if not job.is_cache:
                reason = cov.problem.split(" — ")[0]
                raise HistoclusterError(
                    f"{reason} — choose another 'feature store' (or leave it empty for the cache)"
                )
            overwrite = True
        if not cov.complete:
            todo.append(path)
        progress("checking", i + 1, len(job.slides))
    if not todo:
        return FeatureReport()
    if overwrite:
        todo = list(job.slides)  # the cache store is rebuilt whole
    store_path = job.store_path()
    store_path.parent.mkdir(parents=True, exist_ok=True)
    cfg = engine_extract.ExtractConfig(
        slides=tuple(str(p) for p in todo),
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
    summary = engine_extract.run(cfg, progress=progress)
    failures = [f["error"] for f in summary.failures]
    unreadable_slides = [f for f in summary.failures if "tiles_unreadable" not in f]
    if unreadable_slides and len(unreadable_slides) == len(todo):
        raise HistoclusterError(unreadable_slides[0]["error"])
    return FeatureReport(int(summary.tiles), failures, int(summary.tiles_unreadable))


def gui_batch_size() -> int:
    """Tiles per batch in the GUI: small on CPU, so progress and Cancel respond within a second."""
    import torch

    return 64 if torch.cuda.is_available() else 16


def count_done(store_path: Path, slide: str) -> tuple[int, int]:
    """(encoded, to encode) tissue tiles of ``slide`` in the store at ``store_path``."""
    sf = FeatureStore.open(store_path).slide(slide)
    selected = sf.selected
    return int((selected & sf.done).sum()), int(selected.sum())


# ---------------------------------------------------------------------- views


@dataclass
class ClusterView:
    """A cluster run as the widget shows it: labels of every slide, counts, its curation."""

    store_path: Path
    run: str
    slide_ids: list[str]
    sources: dict[str, Path]  # slide id -> slide file
    mpp: dict[str, tuple[float, float]]  # slide id -> level-0 um/px the store used
    geometry: dict[str, GridGeometry]
    labels: dict[str, np.ndarray]  # slide id -> (rows, cols) int16, -1 outside tissue
    counts: dict[str, np.ndarray]  # slide id -> (k,) int64 tiles per cluster
    failed: dict[str, np.ndarray]  # slide id -> (rows, cols) bool tiles unreadable (not clustered)
    exemplars: list[list[np.ndarray]]  # per cluster, up to 3 (tile_px, tile_px, 3) uint8 tiles
    curation: Curation
    carried: list[str] = field(default_factory=list)  # what carry_over moved and cleared
    carried_lost: list[str] = field(default_factory=list)  # of those, what was lost (warnings)
    job: ClusterJob | None = None
    encoded: int = 0
    warnings: list[str] = field(default_factory=list)
    centroids: np.ndarray | None = None  # (k, dim) float32, the run's (for the next carry-over)

    @property
    def k(self) -> int:
        return self.curation.k

    @property
    def n_failed(self) -> int:
        """Unreadable tiles over the whole cohort."""
        return int(sum(int(f.sum()) for f in self.failed.values()))

    @property
    def totals(self) -> np.ndarray:
        """(k,) int64 tiles per cluster over the whole cohort."""
        return np.sum([self.counts[s] for s in self.slide_ids], axis=0).astype(np.int64)

    def run_data(self) -> ClusterRun | None:
        """The run's centroids and labels as the store holds them (None without centroids)."""
        if self.centroids is None:
            return None
        return ClusterRun({}, self.centroids, dict(self.labels))


ViewHook = Callable[[ClusterView], None]
"""``on_view(view)``: called in the worker thread with a new run's view before it is written."""


def next_run_name(store: FeatureStore, k: int) -> str:
    """``napari-k<k>``, then ``napari-k<k>-2``, ... (the first free name)."""
    taken = set(store.cluster_runs())
    name, i = f"{RUN_PREFIX}{k}", 2
    while name in taken:
        name, i = f"{RUN_PREFIX}{k}-{i}", i + 1
    return name


def latest_curation(store: FeatureStore) -> Curation | None:
    """The saved curation of the store's most recent run that has one (None when none has)."""
    for run in reversed(store.cluster_runs()):
        try:
            if store.read_run_json(run, "curation") is not None:
                return Curation.load(store, run)
        except StoreError:
            continue
    return None


def cluster(
    job: ClusterJob,
    previous: Curation | None = None,
    previous_store: Path | None = None,
    *,
    progress: Progress = no_progress,
    on_view: ViewHook | None = None,
) -> ClusterView:
    """Encode what the job's store lacks, K-means over all its slides, carry the names over.

    ``on_view``: see :func:`cluster_store` (the view painted before the run is written).
    """
    report = ensure_features(job, progress=progress)

    def shown(view: ClusterView) -> None:
        view.job, view.encoded = job, report.encoded
        view.warnings = report.failures + view.warnings
        if on_view is not None:
            on_view(view)

    return cluster_store(
        job.store_path(),
        job.slide_ids,
        job.k,
        previous,
        previous_store,
        job.seed,
        progress=progress,
        on_view=shown,
    )


def recluster(
    view: ClusterView,
    k: int,
    *,
    progress: Progress = no_progress,
    on_view: ViewHook | None = None,
) -> ClusterView:
    """K-means again with another ``k`` from the stored features, carrying the curation over.

    ``on_view``: see :func:`cluster_store` (the repaint before the run is written).
    """
    job = view.job.with_k(k) if view.job is not None else None

    def shown(new: ClusterView) -> None:
        new.job = job
        if on_view is not None:
            on_view(new)

    return cluster_store(
        view.store_path,
        view.slide_ids,
        k,
        view.curation.copy(),
        view.store_path,
        progress=progress,
        on_view=shown,
        previous_run=view.run_data(),
    )


def cluster_store(
    store_path: Path,
    slide_ids: Sequence[str],
    k: int,
    previous: Curation | None = None,
    previous_store: Path | None = None,
    seed: int = 0,
    *,
    progress: Progress = no_progress,
    on_view: ViewHook | None = None,
    previous_run: ClusterRun | None = None,
) -> ClusterView:
    """A new run over ``slide_ids`` of the store, its curation carried from ``previous``.

    Without ``previous`` the store's latest saved curation is carried over, so names made
    before napari was closed come back. The new curation is saved beside the new run.

    The view is built from the clustering in memory (nothing is read back), and the names are
    carried over before the run is written: ``on_view(view)`` is then called (in the calling
    thread) with the view the function returns, so the caller can paint it at once; the run
    and its curation are written after it, and are complete in the store when the function
    returns. No progress is reported after ``on_view``, so a Cancel pressed then does not stop
    the write; a cancel or an error before it leaves no new run. Until the function returns
    the run is not listed: do not save the view's curation before that.

    ``previous_run``: the centroids and labels of ``previous``'s run when the caller holds
    them (read from the store otherwise).
    """
    store = FeatureStore.open(store_path, mode="r+")
    known = set(store.slide_ids())
    ready = [s for s in slide_ids if s in known]
    if previous is None:
        previous, previous_store = latest_curation(store), store_path
    cfg = engine_cluster.ClusterConfig(
        store=store_path,
        k=int(k),
        name=next_run_name(store, int(k)),
        slides=tuple(ready),
        seed=int(seed),
        exemplars=N_EXEMPLARS,
        overlays=False,
        quiet=True,
    )
    views: list[ClusterView] = []

    def shown(result: engine_cluster.ClusterResult) -> None:
        moved = _carried(store, result, previous, previous_store, previous_run)
        view = _result_view(store, result, moved.curation)
        view.carried, view.carried_lost = moved.report, moved.lost
        views.append(view)
        if on_view is not None:
            on_view(view)

    result = engine_cluster.run_clustering(
        store, cfg, progress=progress, features=FEATURES, on_result=shown
    )
    (view,) = views
    # the run's creation time is set by the write; the curation names it (Curation.load checks)
    view.curation.run_created = store.read_cluster_run(result.run, slide_ids=[]).attrs["created"]
    view.curation.save(store)
    view.warnings = view.warnings + [w for w in result.warnings if w not in view.warnings]
    return view


def _carried(
    store: FeatureStore,
    result: engine_cluster.ClusterResult,
    previous: Curation | None,
    previous_store: Path | None,
    previous_run: ClusterRun | None,
) -> CarryOver:
    """The new run's curation carried over from ``previous`` (before the run is written)."""
    k = len(result.centroids)
    if previous is None:
        return CarryOver(Curation(result.run, k), [], [])
    same = previous_store is None or Path(previous_store).resolve() == Path(store.path).resolve()
    old_store = store if same else FeatureStore.open(previous_store)  # type: ignore[arg-type]
    try:
        moved = carry_over(
            previous,
            store,
            result.run,
            old_store=old_store,
            old_data=previous_run if same else None,
            new_data=ClusterRun({}, result.centroids, result.labels),
        )
    except (HistoclusterError, KeyError, ValueError) as e:
        line = f"names of run {previous.run!r} not carried over: {e}"
        return CarryOver(Curation(result.run, k), [line], [line])
    return moved


def _slide_fields(sids: Sequence[str], attrs: dict[str, dict]) -> dict[str, dict]:
    """A view's per-slide sources, um/px and grid geometry from the store's slide attrs."""
    return {
        "sources": {s: Path(attrs[s]["source_path"]) for s in sids},
        "mpp": {s: tuple(float(v) for v in attrs[s]["mpp"]) for s in sids},
        "geometry": {s: GridGeometry.from_store_attrs(attrs[s]) for s in sids},
    }


def _result_view(
    store: FeatureStore, result: engine_cluster.ClusterResult, curation: Curation
) -> ClusterView:
    """The view of a clustering from its result in memory (what ``_view`` reads back)."""
    sids = sorted(result.labels)
    attrs = result.slide_attrs
    return ClusterView(
        store_path=Path(store.path),
        run=result.run,
        slide_ids=sids,
        **_slide_fields(sids, attrs),
        labels=dict(result.labels),
        counts={s: np.asarray(result.counts[s], np.int64) for s in sids},
        failed={s: np.asarray(result.failed[s], bool) for s in sids},
        exemplars=result.exemplar_tiles or [[] for _ in range(len(result.centroids))],
        curation=curation,
        warnings=list(result.warnings),
        centroids=result.centroids,
    )


def open_run(
    store_path: Path, run: str | None = None, *, progress: Progress = no_progress
) -> ClusterView:
    """The store's run ``run`` (default: the latest) with its saved curation, as the widget shows it."""
    store = FeatureStore.open(store_path)
    run = run or store.latest_cluster_run()
    if run is None:
        raise HistoclusterError(f"{store_path}: holds no cluster run yet — click Cluster")
    curation = Curation.load(store, run)
    attrs = store.read_cluster_run(run, slide_ids=[]).attrs
    exemplars = read_exemplar_tiles(store, attrs.get("exemplars", []), progress)
    return _view(store, run, curation, exemplars)


def _view(
    store: FeatureStore, run: str, curation: Curation, exemplars: list[list[np.ndarray]]
) -> ClusterView:
    data = store.read_cluster_run(run)
    k = len(data.centroids)
    sids = sorted(data.labels)
    labels = {s: np.asarray(data.labels[s]) for s in sids}
    counts = {
        s: np.bincount(labels[s][labels[s] >= 0].ravel(), minlength=k).astype(np.int64)
        for s in sids
    }
    attrs = {s: store.slide(s).attrs for s in sids}
    failed = {s: np.asarray(store.slide(s).failed, bool) for s in sids}
    return ClusterView(
        store_path=Path(store.path),
        run=run,
        slide_ids=sids,
        **_slide_fields(sids, attrs),
        labels=labels,
        counts=counts,
        failed=failed,
        exemplars=exemplars or [[] for _ in range(k)],
        curation=curation,
        centroids=data.centroids,
    )


def read_exemplar_tiles(
    store: FeatureStore, exemplars: Sequence[Sequence[dict]], progress: Progress = no_progress
) -> list[list[np.ndarray]]:
    """Pixels (tile_px, tile_px, 3) uint8 of a run's recorded exemplars, per cluster."""
    total = sum(len(row) for row in exemplars)
    out: list[list[np.ndarray]] = []
    done = 0
    progress("exemplars", 0, total)
    with SlideCache(capacity=4) as slides:
        for row in exemplars:
            tiles = []
            for e in row:
                tiles.append(read_tile(store, slides, e["slide_id"], int(e["row"]), int(e["col"])))
                done += 1
            out.append(tiles)
            progress("exemplars", done, total)
    return out


def read_tile(
    store: FeatureStore, slides: SlideCache, sid: str, row: int, col: int, px: int | None = None
) -> np.ndarray:
    """(px, px, 3) uint8 pixels of one grid tile (grey when its slide cannot be read)."""
    tiling = store.tiling
    px = int(px or tiling.tile_px)
    sf = store.slide(sid)
    try:
        slide = slides.get(sf.source_path, tuple(sf.attrs["mpp"]))
        x, y = (int(v) for v in sf.origins[row, col])
        tile = slide.read_tile_at_mpp((x, y), tiling.target_mpp, tiling.tile_px)
    except (HistoclusterError, OSError):
        return np.full((px, px, 3), 200, np.uint8)
    if tile.shape[0] != px:
        tile = np.asarray(Image.fromarray(tile).resize((px, px), Image.Resampling.BILINEAR))
    return tile


def save_curation(view: ClusterView) -> None:
    """Write the view's curation beside its run (atomic; what export and a reopen read)."""
    view.curation.save(FeatureStore.open(view.store_path, mode="r+"))


# ---------------------------------------------------------------------- similar tiles


def similar_tiles(
    view: ClusterView, sid: str, tile: tuple[int, int], top: int
) -> list[tuple[int, int, float]]:
    """(row, col, cosine similarity) of slide ``sid``'s ``top`` tiles most like ``tile`` (itself excluded)."""
    store = FeatureStore.open(view.store_path)
    vector = tile_vector(store, sid, int(tile[0]), int(tile[1]))
    hits = query_similar(store, vector, top, [sid], exclude=[(sid, *tile)])
    return [(h.row, h.col, h.similarity) for h in hits]


# ---------------------------------------------------------------------- export


@dataclass
class ExportReport:
    """Patches written per class and per slide, and where."""

    out_dir: Path
    per_class: dict[str, int]
    per_slide: dict[str, dict[str, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    geojson: list[Path] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.per_class.values())

    @classmethod
    def of(cls, out_dir: Path | str, result: engine_export.ExportResult) -> ExportReport:
        """What ``engine.export.run`` reports, as the widget shows it."""
        return cls(
            Path(out_dir),
            dict(result.per_class),
            {s: dict(c) for s, c in result.per_slide.items()},
            list(result.warnings) + list(result.failures),
            list(result.geojson),
        )


def check_names(names: Sequence[str]) -> str | None:
    """Why these class names cannot be exported (None when they can): ``engine.export``'s rules."""
    try:
        engine_export.check_class_names(list(names))
    except (ValueError, HistoclusterError) as e:
        return str(e)
    return None


def export_curation(
    view: ClusterView, out_dir: Path, *, progress: Progress = no_progress
) -> ExportReport:
    """Save the view's curation, then export the run with it through ``engine.export``.

    The same files as ``python -m engine.export STORE --run RUN --out DIR --geojson``: the
    classes of the selected named clusters and the per-tile overrides, over every slide of the
    run, with ``manifest.csv``, ``export.json`` and a GeoJSON per slide.
    """
    save_curation(view)
    cfg = engine_export.ExportConfig(
        store=view.store_path, out=Path(out_dir), run=view.run, geojson=True, quiet=True
    )
    return ExportReport.of(out_dir, engine_export.run(cfg, progress=progress))


__all__ = [
    "ENCODER_IDS",
    "STAGES",
    "Cancelled",
    "ClusterJob",
    "ClusterView",
    "EncoderIds",
    "ExportReport",
    "HistoclusterError",
    "check_names",
    "cluster",
    "export_curation",
    "open_run",
    "recluster",
    "save_curation",
    "similar_tiles",
]
