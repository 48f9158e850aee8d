"""``python -m engine.cluster``: mini-batch K-means over the tissue tiles of a feature store.

Fits centroids on (a sample of) the tissue tiles of the chosen slides, streamed chunk by chunk
from ``features.zarr`` (``engine.kmeans``), assigns every tissue tile of those slides, and
writes ``clusters/<run>/`` through ``FeatureStore.write_cluster_run``: centroids, per-slide
label maps (-1 outside tissue) and attrs (k, seed, algorithm, the encoder of the features, tiles
used, the configuration, per-slide tile counts and shares per cluster, the exemplar tiles).
Beside them, through the same call, the files ``exemplars.png`` (the tiles nearest each
centroid, read back from the slides, as in the paper's Figure 3) and ``overlays/<slide_id>.png``
(``FeatureStore.run_file``). The run is marked complete only once all of it is written, so a
cancelled or killed run is never listed and the same command run again replaces it.

Progress stages: ``features`` (tiles read into memory, once per run, or not at all when a
``ClusterFeatures`` held by the caller still holds them), ``kmeans`` (rows), ``assign``
(tiles), ``exemplars`` (tiles read), ``overlays`` (slides).

    python -m engine.cluster features.zarr --k 8 --name k8 --exemplars 3
"""

from __future__ import annotations

import io
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine import cli
from engine.cli import option
from engine.cluster_features import ClusterFeatures, FeatureTable
from engine.errors import HistoclusterError, SlideError, one_line
from engine.kmeans import (
    KMeansFit,
    KMeansSettings,
    assign,
    fit_kmeans,
    fit_streamed_kmeans,
    l2_normalize,
)
from engine.mosaic import cluster_colors, exemplar_mosaic, label_overlay
from engine.progress import Progress, Throttle, no_progress
from engine.slide import SlideCache
from engine.store import FeatureStore
from engine.tile_ref import TileRef

__all__ = [
    "ALGORITHM",
    "ClusterConfig",
    "ClusterFeatures",
    "ClusterResult",
    "Exemplar",
    "default_run_name",
    "format_summary",
    "main",
    "normalizer",
    "run",
    "run_clustering",
]

Normalize = Literal["l2", "none"]
ALGORITHM = "minibatch-kmeans"
DEFAULT_SAMPLE = 200_000
EXEMPLARS_FILE = "exemplars.png"
_RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_GREY = 200  # exemplar cells of a slide that cannot be read


@dataclass(frozen=True)
class ClusterConfig:
    """Everything that decides a clustering run (see ``--help``)."""

    store: Path = option(
        positional=True, parse=Path, help="the features.zarr written by python -m engine.extract"
    )
    k: int = option(8, help="number of clusters")
    name: str | None = option(
        None, help="run name, letters/digits/._- (default: k<K>, k<K>-2... when taken)"
    )
    slides: tuple[str, ...] = option(
        default_factory=tuple,
        metavar="ID",
        show_default=False,
        help="slide ids to cluster (default: all in the store)",
    )
    sample: int = option(
        DEFAULT_SAMPLE,
        help="at most this many tissue tiles, drawn at random, fit the centroids; 0 = all "
        "(default: %(default)s); every tile is assigned regardless",
    )
    normalize: Normalize = option(
        "l2", help="feature transform before clustering; l2 gives cosine geometry"
    )
    seed: int = option(
        0,
        help="seed of sampling, k-means++ and batch order; same seed, same clusters "
        "(default: %(default)s)",
    )
    exemplars: int = option(
        3, help="tiles nearest each centroid shown in exemplars.png; 0 = no mosaic"
    )
    batch_size: int = option(2048, help="tiles per mini-batch update")
    max_passes: int = option(3, help="passes over the fitting tiles, fewer when centroids settle")
    overlays: bool = option(True, help="draw the overlay PNG per slide; --no-overlays skips them")
    thumbnail_px: int = option(1024, help="longest side of the overlay PNGs")
    overwrite: bool = option(False, help="replace an existing run of the same --name")
    quiet: bool = option(False, help="no progress bars and no summary table")

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "slides", tuple(self.slides))

    def problem(self) -> str | None:
        """One line saying which value is out of range (None when all are usable)."""
        where = str(self.store)
        if self.k < 1:
            return f"{where}: --k must be at least 1, got {self.k} — pass --k 1 or more"
        for flag, value in (("--sample", self.sample), ("--exemplars", self.exemplars)):
            if value < 0:
                return f"{where}: {flag} must be 0 or more, got {value} — fix the value"
        if self.max_passes < 0:
            return f"{where}: --max-passes must be 0 or more, got {self.max_passes} — fix the value"
        if self.batch_size < 1:
            return f"{where}: --batch-size must be at least 1, got {self.batch_size} — pass --batch-size 2048"
        if self.thumbnail_px < 1:
            return f"{where}: --thumbnail-px must be at least 1, got {self.thumbnail_px} — pass --thumbnail-px 1024"
        if self.name is not None and (not _RUN_NAME.match(self.name) or set(self.name) == {"."}):
            return (
                f"{where}: run name {self.name!r} may use only letters, digits, '.', '_' and '-' "
                "(and not only dots) — pass another --name"
            )
        return None

    def kmeans(self) -> KMeansSettings:
        """The K-means settings of this run (the library defaults for the rest)."""
        return KMeansSettings(
            self.k,
            sample=self.sample or None,
            seed=self.seed,
            batch_size=self.batch_size,
            max_passes=self.max_passes,
        )

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON values (the run's ``config`` attrs)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["store"] = str(Path(self.store).resolve())
        d["slides"] = list(self.slides)
        return d


@dataclass(frozen=True, slots=True)
class Exemplar(TileRef):
    """A tile near a centroid: where it is and its distance (in the clustering's feature space)."""

    cluster: int
    distance: float


@dataclass
class ClusterResult:
    """What a clustering wrote.

    run: its name. centroids: (k, dim) float32. labels: {slide_id: (rows, cols) int16, -1
    outside tissue}. counts: {slide_id: [tiles per cluster]}. exemplars: per cluster, the
    nearest tiles. exemplar_tiles: per cluster, those tiles' pixels (tile_px, tile_px, 3) uint8
    (grey when the slide cannot be read; empty lists with ``--exemplars 0``). pictures: the
    files written beside the run. warnings: one line each (tiles not encoded, unreadable slides).
    slide_attrs: {slide_id: the store's attrs of the slide (source path, mpp, grid geometry)}.
    failed: {slide_id: (rows, cols) bool, selected tiles recorded unreadable (labelled -1)}.
    The last two let a caller show the run without reading the store again.
    """

    run: str
    centroids: np.ndarray
    labels: dict[str, np.ndarray]
    counts: dict[str, list[int]]
    exemplars: list[list[Exemplar]]
    n_fit: int
    n_tiles: int
    exemplar_tiles: list[list[np.ndarray]] = field(default_factory=list)
    pictures: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    slide_attrs: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, np.ndarray] = field(default_factory=dict)


def normalizer(kind: Normalize):
    """The feature transform of ``--normalize``: (n, dim) -> (n, dim) float32."""
    if kind == "l2":
        return l2_normalize
    if kind == "none":
        return lambda x: np.asarray(x, dtype=np.float32)
    raise ValueError(f"--normalize must be l2 or none, got {kind!r}")


def default_run_name(store: FeatureStore, k: int) -> str:
    """``k<k>``, or ``k<k>-2``, ``k<k>-3``... when taken."""
    taken = set(store.cluster_runs())
    name, i = f"k{k}", 2
    while name in taken:
        name, i = f"k{k}-{i}", i + 1
    return name


def overlay_file(slide_id: str) -> str:
    """The run-file name of a slide's overlay (``FeatureStore.run_file(run, overlay_file(sid))``)."""
    return f"overlays/{slide_id}.png"


def _keep_nearest(
    best_d: np.ndarray, best_id: np.ndarray, c: int, d: np.ndarray, ids: np.ndarray
) -> None:
    """Merge candidates (d (n,), ids (n, 3)) of cluster ``c`` into its m nearest so far (stable)."""
    m = best_d.shape[1]
    if len(d) > m:
        keep = np.argpartition(d, m - 1)[:m]
        d, ids = d[keep], ids[keep]
    all_d = np.concatenate([best_d[c], d])
    all_id = np.concatenate([best_id[c], ids])
    order = np.lexsort((all_id[:, 2], all_id[:, 1], all_id[:, 0], all_d))[:m]
    best_d[c], best_id[c] = all_d[order], all_id[order]


def _check(store: FeatureStore, cfg: ClusterConfig) -> tuple[list[str], str]:
    """The slides to cluster and the run name, or ``HistoclusterError`` with one line."""
    problem = cfg.problem()
    if problem:
        raise HistoclusterError(problem)
    slides = sorted(set(cfg.slides)) if cfg.slides else store.slide_ids()
    if not slides:
        raise HistoclusterError(
            f"{store.path}: holds no slides — run python -m engine.extract first"
        )
    known = set(store.slide_ids())
    missing = [s for s in slides if s not in known]
    if missing:
        raise HistoclusterError(
            f"{store.path}: no slide {', '.join(map(repr, missing))} (slides: {', '.join(sorted(known))}) — check --slides"
        )
    name = cfg.name or default_run_name(store, cfg.k)
    if name in store.cluster_runs() and not cfg.overwrite:
        raise HistoclusterError(
            f"{store.path}: cluster run {name!r} exists — pass --overwrite or another --name"
        )
    return slides, name


def run_clustering(
    store: FeatureStore,
    cfg: ClusterConfig,
    *,
    progress: Progress = no_progress,
    features: ClusterFeatures | None = None,
    on_result: Callable[[ClusterResult], None] | None = None,
) -> ClusterResult:
    """Cluster ``store`` (open for writing) as ``cfg`` says; see the module doc.

    ``features``: a :class:`~engine.cluster_features.ClusterFeatures` the caller keeps across
    runs (the GUI, between k changes): its table of normalised features is reused while the
    store's features are unchanged, and so are the exemplar pixels it read. Without one, the
    features are read once for this run (stage ``features``), or streamed twice from the store
    (fit, then assignment) when they are over the cache's ``max_bytes``. Results are the same
    either way, bit for bit: same seed, same centroids and labels.

    ``on_result(result)``: called once the result is whole in memory (labels, counts, the
    exemplars and their pixels), before anything is written, so a caller can show it while
    the run is written (the GUI's repaint); ``result.pictures`` is filled and
    ``result.warnings`` may grow afterwards. What it raises propagates and nothing is written.
    After it, ``progress`` is called only for ``overlays`` (none with ``--no-overlays``).

    A ``Cancelled`` raised by ``progress`` stops the run at that report; the store then holds
    no new complete run (an existing run of the same name is kept when the cancel came before
    the writing started, i.e. in ``features``, ``kmeans``, ``assign`` or ``exemplars``).
    """
    slides, run_name = _check(store, cfg)
    norm = normalizer(cfg.normalize)
    holder = features if features is not None else ClusterFeatures(tile_capacity=0)
    table = holder.table(store, slides, cfg.normalize, norm, progress=progress)
    if table is not None:
        done = _fit_in_memory(store, cfg, table, progress)
    else:
        done = _fit_streamed(store, cfg, slides, norm, progress)
    fit, labels, counts, n_tiles = done.fit, done.labels, done.counts, done.n_tiles

    warnings: list[str] = []
    for s, n in done.pending.items():
        if n:
            warnings.append(
                f"{store.path}: slide {s!r} has {n} tissue tiles not encoded yet (labelled -1) — finish python -m engine.extract"
            )
    k, m = cfg.k, cfg.exemplars
    exemplars: list[list[Exemplar]] = []
    for c in range(k):
        row = []
        for j in range(m):
            si, r, col = (int(v) for v in done.best_id[c, j])
            if si < 0:
                continue
            ox, oy = (int(v) for v in done.origins(slides[si])[r, col])
            row.append(Exemplar(slides[si], r, col, ox, oy, c, float(done.best_d[c, j])))
        exemplars.append(row)

    counts_json = {s: [int(v) for v in counts[s]] for s in slides}
    totals = np.sum([counts[s] for s in slides], axis=0)
    colors = cluster_colors(k)
    attrs = {
        "algorithm": ALGORITHM,
        "seed": cfg.seed,
        "normalize": cfg.normalize,
        "encoder": store.encoder.to_attrs(),
        "n_fit_tiles": int(fit.n_fit),
        "n_tiles": int(n_tiles),
        "passes": fit.passes,
        "steps": fit.steps,
        "tiles_pending": done.pending,
        "counts": counts_json,
        "shares": {
            s: [round(int(v) / max(1, int(counts[s].sum())), 6) for v in counts[s]] for s in slides
        },
        "cluster_tiles": [int(v) for v in totals],
        "exemplars": [[asdict(e) for e in row] for row in exemplars],
        "colors": [[int(v) for v in c] for c in colors],
        "config": {**cfg.to_json(), "name": run_name},
    }
    result = ClusterResult(
        run_name, fit.centroids, labels, counts_json, exemplars, fit.n_fit, n_tiles,
        warnings=warnings, slide_attrs=done.slide_attrs, failed=done.failed,
    )  # fmt: skip
    with SlideCache(capacity=4) as cache:
        slides_open = _SlideReader(cache, result)
        if m:
            result.exemplar_tiles = _exemplar_tiles(store, result, slides_open, holder, progress)
        if on_result is not None:
            on_result(result)
        # overwrite also clears a group a killed run left incomplete (cluster_runs() lists complete ones)
        store.write_cluster_run(
            run_name,
            fit.centroids,
            labels,
            attrs,
            overwrite=True,
            files=_pictures(cfg, result, colors, slides_open, progress),
        )
    names = ([EXEMPLARS_FILE] if m else []) + (
        [overlay_file(s) for s in slides] if cfg.overlays else []
    )
    result.pictures = [p for p in (store.run_file(run_name, n) for n in names) if p is not None]
    return result


@dataclass
class _Assigned:
    """What the fit and the assignment give the rest of a run."""

    fit: KMeansFit
    labels: dict[str, np.ndarray]  # (rows, cols) int16 per slide, -1 outside tissue
    counts: dict[str, np.ndarray]  # (k,) tiles per cluster per slide
    best_d: np.ndarray  # (k, m) distances of each cluster's nearest tiles
    best_id: np.ndarray  # (k, m, 3) their (slide index, row, col); -1 when fewer
    pending: dict[str, int]  # tissue tiles not encoded yet per slide
    n_tiles: int  # tiles assigned
    slide_attrs: dict[str, dict[str, Any]]
    origins: Callable[[str], np.ndarray]  # slide id -> (rows, cols, 2) level-0 origins
    failed: dict[str, np.ndarray]  # (rows, cols) bool unreadable tiles per slide


def _too_few(store: FeatureStore, slides: Sequence[str], n_tiles: int, k: int) -> None:
    if n_tiles < k:
        raise HistoclusterError(
            f"{store.path}: {n_tiles} encoded tissue tiles in {', '.join(slides)}, fewer than k={k} — lower --k or add slides"
        )


def _fit_in_memory(
    store: FeatureStore, cfg: ClusterConfig, table: FeatureTable, progress: Progress
) -> _Assigned:
    """K-means and the assignment of every tile on a table of features held in memory."""
    slides = table.slide_ids
    _too_few(store, slides, table.n, cfg.k)
    fit = fit_kmeans(table.x, cfg.kmeans(), sq=table.sq, progress=progress)
    k, m = cfg.k, cfg.exemplars
    lab = np.empty(table.n, np.int64)
    dist = np.empty(table.n, np.float32)
    report = Throttle(progress)
    report("assign", 0, table.n)
    for a, b in table.chunks():  # the store's chunks: the same products as the streamed path
        lab[a:b], dist[a:b] = assign(table.x[a:b], fit.centroids, sq=table.sq[a:b])
        report("assign", b, table.n)
    labels, counts = {}, {}
    for s in slides:
        a, b = table.spans[s]
        labels[s] = np.full(table.shapes[s], -1, dtype=np.int16)
        labels[s][table.rows[a:b], table.cols[a:b]] = lab[a:b]
        counts[s] = np.bincount(lab[a:b], minlength=k)
    best_d, best_id = _nearest(table, lab, dist, k, m)
    report("assign", table.n, table.n)
    return _Assigned(
        fit, labels, counts, best_d, best_id, dict(table.pending), table.n, dict(table.attrs),
        table.origins.__getitem__, dict(table.failed),
    )  # fmt: skip


def _nearest(
    table: FeatureTable, lab: np.ndarray, dist: np.ndarray, k: int, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """(k, m) distances and (k, m, 3) (slide index, row, col) of each cluster's m nearest tiles.

    Ordered by distance, then slide, row, column (ties broken the same way every time).
    """
    best_d = np.full((k, m), np.inf)
    best_id = np.full((k, m, 3), -1, dtype=np.int64)
    if not m:
        return best_d, best_id
    slide_index = np.empty(table.n, np.int64)
    for i, s in enumerate(table.slide_ids):
        a, b = table.spans[s]
        slide_index[a:b] = i
    order = np.argsort(lab, kind="stable")
    starts = np.searchsorted(lab[order], np.arange(k + 1))
    for c in range(k):
        members = order[starts[c] : starts[c + 1]]
        if not len(members):
            continue
        d = dist[members].astype(np.float64)
        if len(d) > m:  # every tile within the m-th distance (ties included), then the order
            cut = np.partition(d, m - 1)[m - 1]
            keep = d <= cut
            members, d = members[keep], d[keep]
        ids = np.stack([slide_index[members], table.rows[members], table.cols[members]], axis=1)
        pick = np.lexsort((ids[:, 2], ids[:, 1], ids[:, 0], d))[:m]
        best_d[c, : len(pick)], best_id[c, : len(pick)] = d[pick], ids[pick]
    return best_d, best_id


def _fit_streamed(
    store: FeatureStore,
    cfg: ClusterConfig,
    slides: list[str],
    norm: Callable[[np.ndarray], np.ndarray],
    progress: Progress,
) -> _Assigned:
    """K-means streamed from the store, then a second pass assigning every tile (large stores)."""
    sfs = {s: store.slide(s) for s in slides}  # one each: origins are read once per instance
    pending = {s: int(sf.pending().sum()) for s, sf in sfs.items()}
    n_tiles = store.n_tissue_tiles(slides)
    _too_few(store, slides, n_tiles, cfg.k)

    def source() -> Iterator[np.ndarray]:
        for tf in store.iter_tissue_features(slides):
            yield norm(tf.features)

    fit = fit_streamed_kmeans(source, cfg.kmeans(), n_total=n_tiles, progress=progress)
    k, m = cfg.k, cfg.exemplars
    labels = {s: np.full(sfs[s].shape, -1, dtype=np.int16) for s in slides}
    counts = {s: np.zeros(k, dtype=np.int64) for s in slides}
    best_d = np.full((k, m), np.inf)
    best_id = np.full((k, m, 3), -1, dtype=np.int64)  # (slide index, row, col)
    report = Throttle(progress)
    done = 0
    report("assign", 0, n_tiles)
    for tf in store.iter_tissue_features(slides):
        lab, dist = assign(norm(tf.features), fit.centroids)
        labels[tf.slide_id][tf.rows, tf.cols] = lab
        counts[tf.slide_id] += np.bincount(lab, minlength=k)
        if m:
            si = slides.index(tf.slide_id)
            ids = np.stack([np.full(len(lab), si), tf.rows, tf.cols], axis=1)
            for c in np.unique(lab):
                sel = lab == c
                _keep_nearest(best_d, best_id, int(c), dist[sel].astype(np.float64), ids[sel])
        done += len(lab)
        report("assign", done, n_tiles)
    attrs = {s: sf.attrs for s, sf in sfs.items()}
    failed = {s: sf.failed for s, sf in sfs.items()}
    return _Assigned(
        fit, labels, counts, best_d, best_id, pending, n_tiles, attrs, lambda s: sfs[s].origins,
        failed,
    )  # fmt: skip


class _SlideReader:
    """The slides of a run opened once each for its pictures; a slide that cannot be read is
    not tried again, and leaves one warning in the result."""

    def __init__(self, cache: SlideCache, result: ClusterResult) -> None:
        self.cache, self.result = cache, result
        self.unreadable: set[str] = set()

    def get(self, sid: str):
        """The open slide ``sid``, or None when it cannot be read."""
        if sid in self.unreadable:
            return None
        attrs = self.result.slide_attrs[sid]
        try:
            return self.cache.get(Path(attrs["source_path"]), mpp=tuple(attrs["mpp"]))
        except SlideError as e:
            self.failed(sid, e, "pictures of slide {sid!r} left blank", forget=False)
            return None

    def failed(self, sid: str, error: Exception, what: str, forget: bool = True) -> None:
        """Record that ``sid`` failed (``what``: the warning's tail, ``{sid!r}`` filled in)."""
        self.unreadable.add(sid)
        if forget:
            self.cache.forget(Path(self.result.slide_attrs[sid]["source_path"]))
        self.result.warnings.append(f"{one_line(error)} ({what.format(sid=sid)})")


def _exemplar_tiles(
    store: FeatureStore,
    result: ClusterResult,
    slides: _SlideReader,
    features: ClusterFeatures,
    progress: Progress,
) -> list[list[np.ndarray]]:
    """(tile_px, tile_px, 3) uint8 pixels of each cluster's exemplars (stage ``exemplars``).

    Pixels ``features`` holds are not read again; a slide that cannot be read leaves grey
    cells and a warning.
    """
    tiling = store.tiling
    grey = np.full((tiling.tile_px, tiling.tile_px, 3), _GREY, np.uint8)
    tiles = [[grey] * len(row) for row in result.exemplars]
    cells = sorted(
        (e.slide_id, c, j) for c, row in enumerate(result.exemplars) for j, e in enumerate(row)
    )  # slide by slide: each slide is opened once
    report = Throttle(progress)
    report("exemplars", 0, len(cells))
    for n, (sid, c, j) in enumerate(cells, 1):
        e = result.exemplars[c][j]
        held = features.tile(sid, e.row, e.col)
        if held is not None:
            tiles[c][j] = held
        elif (slide := slides.get(sid)) is not None:
            try:
                tiles[c][j] = slide.read_tile_at_mpp(
                    (e.l0_x, e.l0_y), tiling.target_mpp, tiling.tile_px
                )
                features.keep_tile(sid, e.row, e.col, tiles[c][j])
            except SlideError as err:
                slides.failed(sid, err, "pictures of slide {sid!r} left blank")
        report("exemplars", n, len(cells))
    return tiles


def _pictures(
    cfg: ClusterConfig,
    result: ClusterResult,
    colors: np.ndarray,
    slides: _SlideReader,
    progress: Progress,
) -> Iterator[tuple[str, bytes]]:
    """(name, PNG bytes) of ``exemplars.png`` and of each ``overlays/<slide_id>.png``, one at a time.

    A slide that cannot be read leaves no overlay and a warning.
    """
    if cfg.exemplars:
        counts = [int(sum(c[i] for c in result.counts.values())) for i in range(len(colors))]
        yield EXEMPLARS_FILE, _png(exemplar_mosaic(result.exemplar_tiles, colors, counts))
    if cfg.overlays:
        ids = list(result.labels)
        progress("overlays", 0, len(ids))
        for n, sid in enumerate(ids, 1):
            slide = slides.get(sid)
            if slide is not None:
                attrs = result.slide_attrs[sid]
                try:
                    thumb = slide.thumbnail(cfg.thumbnail_px)
                except SlideError as err:
                    slides.failed(sid, err, "overlay of slide {sid!r} skipped")
                    thumb = None
                if thumb is not None:
                    img = label_overlay(
                        thumb, result.labels[sid], attrs["stride_l0"], attrs["dimensions"], colors
                    )
                    yield overlay_file(sid), _png(img)
            progress("overlays", n, len(ids))


def _png(image: np.ndarray) -> bytes:
    """PNG bytes of an (h, w, 3) uint8 image (fast zlib level: 5x quicker than the default,
    files about a third larger)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def run(
    cfg: ClusterConfig,
    *,
    progress: Progress = no_progress,
    features: ClusterFeatures | None = None,
) -> ClusterResult:
    """Open ``cfg.store`` for writing and cluster it (:func:`run_clustering`): the library entry."""
    store = FeatureStore.open(cfg.store, mode="r+")
    return run_clustering(store, cfg, progress=progress, features=features)


def format_summary(result: ClusterResult) -> str:
    """A table: cluster, tiles, share overall, then share per slide."""
    slides = list(result.counts)
    k = len(result.centroids)
    totals = [sum(result.counts[s][c] for s in slides) for c in range(k)]
    n = max(1, sum(totals))
    head = ["cluster", "tiles", "share"] + slides
    lines = ["\t".join(head)]
    for c in range(k):
        per = [f"{result.counts[s][c] / max(1, sum(result.counts[s])):.3f}" for s in slides]
        lines.append("\t".join([str(c), str(totals[c]), f"{totals[c] / n:.3f}", *per]))
    return "\n".join(lines)


def report(cfg: ClusterConfig, result: ClusterResult) -> str:
    """The summary printed on stdout: the run, the table, the pictures written.

    ``result.warnings`` are not repeated here: ``cli.main`` prints them on stderr (also with
    ``--quiet``).
    """
    lines = [
        f"{cfg.store}: cluster run {result.run!r}: k={len(result.centroids)}, "
        f"fitted on {result.n_fit} of {result.n_tiles} tissue tiles",
        format_summary(result),
        *(f"wrote {p}" for p in result.pictures),
    ]
    return "\n".join(lines)


_DESCRIPTION = (
    "Mini-batch K-means over the tissue tiles of a feature store (paper section 4.4); writes "
    "clusters/<RUN>/ in the store with exemplars.png and overlays/<slide>.png."
)

_EPILOG = """\
outputs, in STORE/clusters/<RUN>/: centroids (k, dim), slides/<id>/labels (rows, cols; -1
outside tissue), attrs (k, seed, algorithm, the encoder, tiles fitted/assigned, per-slide tile
counts and shares per cluster, exemplar tiles, colours, the configuration), and in files/:
exemplars.png (the tiles nearest each centroid, read from the slides) and
overlays/<slide_id>.png. The run is listed only once all of it is written: an interrupted run
is replaced by the same command run again.

the centroids are fitted on at most --sample tiles drawn at random from all chosen slides,
streamed chunk by chunk (memory stays bounded); every tissue tile is then assigned.

exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.

example:
  python -m engine.cluster features.zarr --k 8 --name k8 --exemplars 3
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the summary on stdout; exit status as ``engine.cli`` says."""
    return cli.main(ClusterConfig, run, argv, description=_DESCRIPTION, epilog=_EPILOG,
                    report=report, report_stream="stdout",
                    interrupted_hint="the interrupted run is not listed; run the same command again")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
