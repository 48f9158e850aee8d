"""``python -m engine.embed STORE --run RUN``: the map — a 2-D embedding of a cluster run's tiles.

1. ``sample``: a stratified sample of the run's tiles (at most ``--sample``, default 50,000):
   every (slide, cluster) stratum gets an equal share, strata smaller than their share give all
   their tiles and the rest is shared among the others; tiles within a stratum drawn at random
   (``--seed``). Their features are read from the store and transformed as the run clustered
   them (``normalize`` attr, l2 by default).
2. ``fit``: PCA of the sample to ``--pca-dims`` (50) components, then UMAP (``umap-learn``) to
   2-D on the sample, on a k-nearest-neighbour graph from :class:`engine.knn.CellIndex` (no
   numba compilation of pynndescent; see there). ``--method pca`` keeps the first two PCA
   components and needs no extra package.
3. ``transform``: every tile of the run, slide by slide: sample tiles keep their fitted
   coordinates, the others are placed at the membership-weighted mean of their nearest sample
   tiles' points (UMAP's transform without its refinement epochs: :func:`membership_weights`),
   or by the PCA projection. Each
   slide's coordinates are written when the slide is finished
   (``clusters/<run>/embedding/slides/<id>/xy``, (rows, cols, 2) float32, NaN where no tile).
4. ``mosaic``: ``files/map/mosaic.png`` (the grid's thumbnails, ``engine.tile_mosaic``) and
   ``files/map/mosaic_clusters.png`` (tinted by each cell's majority cluster).

Everything is seeded: the same store, run and flags give the same coordinates, bit for bit.
The embedding records its identity (the run's ``created`` time and k, the tiles per slide,
method and flags); the same command resumes an interrupted map (the fit is repeated, which
gives the same model, and only unfinished slides are transformed), returns a finished one at
once, and replaces one made for another run or other flags.

A Cancel during ``fit`` returns at once; the worker thread then finishes the UMAP fit in the
background and its result is dropped (nothing is written by it).
"""

from __future__ import annotations

import io
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from engine import cli
from engine.cli import option
from engine.errors import HistoclusterError
from engine.kmeans import l2_normalize
from engine.knn import CellIndex
from engine.mosaic import cluster_colors
from engine.progress import Progress, Throttle, no_progress
from engine.store import FeatureStore
from engine.tile_map import TileMap
from engine.tile_mosaic import cluster_overlay, mosaic_grid, mosaic_image, read_thumbnails

__all__ = [
    "FORMAT_VERSION",
    "MOSAIC_CLUSTERS_FILE",
    "MOSAIC_FILE",
    "EmbedConfig",
    "EmbedResult",
    "Pca",
    "main",
    "run",
    "stratified_sample",
]

FORMAT_VERSION = 1
MOSAIC_FILE = "map/mosaic.png"
MOSAIC_CLUSTERS_FILE = "map/mosaic_clusters.png"
Method = Literal["umap", "pca"]
_TRANSFORM_BATCH = 8192  # tiles placed between progress reports (~0.5 s each)
T = TypeVar("T")


@dataclass(frozen=True)
class EmbedConfig:
    """Everything that decides a map (see ``--help``)."""

    store: Path = option(
        positional=True, parse=Path, help="the features.zarr holding the cluster run"
    )
    run: str | None = option(None, help="the cluster run to map (default: the latest run)")
    method: Method = option(
        "umap", help="umap (needs umap-learn) or pca (first two principal components)"
    )
    sample: int = option(
        50_000, help="at most this many tiles, stratified over slides and clusters, fit the map"
    )
    pca_dims: int = option(50, help="principal components kept before UMAP")
    neighbors: int = option(15, help="UMAP n_neighbors: larger keeps more global structure")
    min_dist: float = option(0.1, help="UMAP min_dist: smaller packs clusters tighter")
    epochs: int = option(
        0,
        help="UMAP optimisation epochs; 0 = 200 for up to 10,000 sample tiles, 100 above "
        "(each epoch costs ~0.2 s per 50,000 tiles on one core)",
    )
    seed: int = option(0, help="seed of the sample, the neighbour index and UMAP")
    grid: int = option(64, help="mosaic cells a side; 0 = no mosaic")
    cell_px: int = option(32, help="pixels a side of each mosaic cell")
    overwrite: bool = option(
        False, help="recompute even when a finished map of these settings exists"
    )
    quiet: bool = option(False, help="no progress bars and no summary")

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))

    def problem(self) -> str | None:
        """One line naming a value out of range (None when all are usable)."""
        where = str(self.store)
        checks = (
            ("--sample", self.sample, 3, "50000"),
            ("--pca-dims", self.pca_dims, 2, "50"),
            ("--neighbors", self.neighbors, 2, "15"),
            ("--grid", self.grid, 0, "64"),
            ("--epochs", self.epochs, 0, "0"),
            ("--cell-px", self.cell_px, 1, "32"),
        )
        for flag, value, least, fix in checks:
            if value < least:
                return f"{where}: {flag} must be at least {least}, got {value} — pass {flag} {fix}"
        if not 0.0 <= self.min_dist <= 1.0:
            return (
                f"{where}: --min-dist must lie in [0, 1], got {self.min_dist} — pass --min-dist 0.1"
            )
        return None

    def identity(self) -> dict[str, Any]:
        """The flags a map depends on (not grid/cell_px: the mosaic is redrawn cheaply)."""
        keep = ("method", "sample", "pca_dims", "neighbors", "min_dist", "epochs", "seed")
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in keep}


@dataclass
class EmbedResult:
    """What a map run did.

    run: the cluster run. n_tiles: tiles on the map. n_sample: tiles the map was fitted on.
    reused: a finished map of the same identity was found (nothing recomputed but the mosaic).
    resumed: slides already finished by an earlier, interrupted run. tile_map: the map.
    pictures: files written. warnings: one line each.
    """

    run: str
    method: str
    n_tiles: int
    n_sample: int
    reused: bool
    resumed: list[str]
    tile_map: TileMap
    pictures: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ sample


def stratified_sample(strata: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``n`` items, an equal share per stratum (water-filling).

    Args:
        strata: (N,) integer stratum of each item.
    Returns:
        (min(n, N),) int64 indices into ``strata``; strata smaller than the share give all their
        items, the remainder is split evenly among the larger ones (lower strata first for the
        last few), and items within a stratum are drawn at random with ``seed``.
    """
    strata = np.asarray(strata)
    if n >= len(strata):
        return np.arange(len(strata), dtype=np.int64)
    keys, inverse, sizes = np.unique(strata, return_inverse=True, return_counts=True)
    quota = np.zeros(len(keys), np.int64)
    left, open_ = int(n), np.ones(len(keys), bool)
    while left > 0 and open_.any():
        share = left // int(open_.sum())
        if share == 0:  # fewer left than open strata: one more each, lowest strata first
            for s in np.flatnonzero(open_)[:left]:
                quota[s] += 1
            break
        room = sizes - quota
        add = np.where(open_, np.minimum(share, room), 0)
        quota += add
        left -= int(add.sum())
        open_ &= quota < sizes
    rng = np.random.default_rng(seed)
    order = np.argsort(inverse, kind="stable")
    starts = np.r_[0, np.cumsum(sizes)]
    picked = [
        order[starts[s] + np.sort(rng.choice(sizes[s], quota[s], replace=False))]
        for s in range(len(keys))
        if quota[s]
    ]
    return np.sort(np.concatenate(picked)).astype(np.int64)


# ------------------------------------------------------------------------------ PCA


@dataclass(frozen=True)
class Pca:
    """A principal-component projection: ``mean`` (dim,), ``components`` (p, dim) float64.

    Fitted by the eigen-decomposition of the covariance (deterministic); each component's sign
    makes its largest-magnitude loading positive.
    """

    mean: np.ndarray
    components: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, dims: int) -> Pca:
        """Fit on ``x`` (n, dim), keeping ``min(dims, dim, n - 1)`` components (at least 1)."""
        x = np.asarray(x, dtype=np.float64)
        mean = x.mean(0)
        cov = np.cov(x - mean, rowvar=False).reshape(x.shape[1], x.shape[1])
        values, vectors = np.linalg.eigh(cov)
        p = max(1, min(int(dims), x.shape[1], len(x) - 1))
        comps = vectors[:, ::-1][:, :p].T.copy()
        big = np.argmax(np.abs(comps), axis=1)
        comps *= np.sign(comps[np.arange(p), big])[:, None]
        return cls(mean, comps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """(n, p) float32 projection of ``x`` (n, dim)."""
        return ((np.asarray(x, dtype=np.float64) - self.mean) @ self.components.T).astype(
            np.float32
        )


def _normalizer(kind: str) -> Callable[[np.ndarray], np.ndarray]:
    if kind == "l2":
        return l2_normalize
    return lambda x: np.asarray(x, dtype=np.float32)


# ------------------------------------------------------------------------------ fitting


def _polled(fn: Callable[[], T], progress: Progress, stage: str, done: int, total: int) -> T:
    """Run ``fn`` in a worker thread, calling ``progress(stage, done, total)`` every 0.25 s.

    A ``Cancelled`` raised by ``progress`` returns at once; the worker finishes in the
    background and its result is dropped.
    """
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=work, name=f"engine.embed-{stage}", daemon=True)
    thread.start()
    while thread.is_alive():
        progress(stage, done, total)
        thread.join(0.25)
    if "error" in box:
        raise box["error"]
    return box["value"]


class _Umap:
    """UMAP fitted on the PCA sample with a :class:`CellIndex` neighbour graph."""

    def __init__(self, z: np.ndarray, cfg: EmbedConfig) -> None:
        try:
            import umap
        except ImportError as e:
            raise HistoclusterError(
                f"{cfg.store}: --method umap needs the umap-learn package ({e}) — "
                "pip install umap-learn, or pass --method pca"
            ) from e
        n_neighbors = min(cfg.neighbors, len(z) - 1)
        self.index = CellIndex(z, seed=cfg.seed)
        knn = self.index.neighbor_graph(n_neighbors)
        self.model = umap.UMAP(
            n_neighbors=n_neighbors,
            n_components=2,
            min_dist=cfg.min_dist,
            random_state=cfg.seed,
            transform_seed=cfg.seed,
            n_jobs=1,
            n_epochs=cfg.epochs or (200 if len(z) <= 10_000 else 100),
            precomputed_knn=(*knn, self.index),
            force_approximation_algorithm=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "not an NNDescent object", n_jobs, disconnected graph
            self.xy = np.asarray(self.model.fit_transform(z), dtype=np.float32)

    def transform(self, z: np.ndarray) -> np.ndarray:
        """(n, 2) map points of ``z`` (n, p): the membership-weighted mean of the fitted map points
        of each row's nearest sample tiles (see :func:`membership_weights`)."""
        idx, dist = self.index.query(z, self.model.n_neighbors)
        w = membership_weights(dist)
        return ((w[..., None] * self.xy[idx]).sum(1) / w.sum(1, keepdims=True)).astype(np.float32)


def membership_weights(dist: np.ndarray, n_iter: int = 64) -> np.ndarray:
    """(n, k) float64 UMAP membership strengths of each point's k neighbours at ``dist`` (n, k).

    UMAP's ``smooth_knn_dist`` as ``UMAP.transform`` uses it (local connectivity 0, so no offset):
    per row, the bandwidth ``sigma`` solving ``sum_{j >= 1} exp(-d_j / sigma) = log2(k)`` by
    bisection, floored at 1e-3 x the row's mean distance; weight ``exp(-d_j / sigma)`` (1 where
    ``d_j`` is 0). ``UMAP.transform`` starts new points at the weighted mean of their
    neighbours' map points with these weights and then refines them with 30 more SGD epochs;
    here the start is the answer: each tile is placed independently of every other (batching
    and resuming change nothing), and the refinement, whose per-point Python set-up alone costs
    more than the whole placement, is skipped.
    """
    d = np.asarray(dist, dtype=np.float64)
    n, k = d.shape
    target = np.log2(k)
    lo, hi, mid = np.zeros(n), np.full(n, np.inf), np.ones(n)
    for _ in range(n_iter):
        psum = np.exp(-d[:, 1:] / mid[:, None]).sum(1)
        big = psum > target
        hi = np.where(big, mid, hi)
        lo = np.where(big, lo, mid)
        mid = np.where(np.isinf(hi), mid * 2, (lo + hi) / 2)
    sigma = np.maximum(mid, 1e-3 * d.mean(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.exp(-d / sigma[:, None])
    w[(d <= 0) | ~np.isfinite(w)] = 1.0
    return w


class _PcaPlane:
    def __init__(self, z: np.ndarray) -> None:
        self.xy = self.transform(z)

    @staticmethod
    def transform(z: np.ndarray) -> np.ndarray:
        xy = np.zeros((len(z), 2), np.float32)
        xy[:, : min(2, z.shape[1])] = z[:, :2]
        return xy


# ------------------------------------------------------------------------------ run


def _resolve_run(store: FeatureStore, cfg: EmbedConfig) -> str:
    run = cfg.run or store.latest_cluster_run()
    if run is None:
        raise HistoclusterError(
            f"{store.path}: no cluster runs — run python -m engine.cluster {store.path} first"
        )
    store.check_cluster_run(run)
    return run


def run(cfg: EmbedConfig, *, progress: Progress = no_progress) -> EmbedResult:
    """Make (or resume, or reuse) the map of ``cfg.run`` in ``cfg.store``; see the module doc."""
    problem = cfg.problem()
    if problem:
        raise HistoclusterError(problem)
    store = FeatureStore.open(cfg.store, mode="r+")
    run_name = _resolve_run(store, cfg)
    cr = store.read_cluster_run(run_name)
    slide_ids = sorted(cr.labels)
    n_per_slide = {sid: int((cr.labels[sid] >= 0).sum()) for sid in slide_ids}
    n_tiles = sum(n_per_slide.values())
    if n_tiles < 3:
        raise HistoclusterError(
            f"{store.path}: cluster run {run_name!r} has {n_tiles} labelled tiles; a map needs 3 "
            "or more — extract more tissue first"
        )
    identity = {
        "format_version": FORMAT_VERSION,
        "run_created": cr.attrs.get("created"),
        "k": int(len(cr.centroids)),
        "normalize": cr.attrs.get("normalize", "l2"),
        "tiles": n_per_slide,
        **cfg.identity(),
    }
    old = store.embedding_attrs(run_name)
    same = old is not None and all(old.get(k) == v for k, v in identity.items())
    result = EmbedResult(run_name, cfg.method, n_tiles, 0, False, [], TileMap.from_grids({}, {}))
    if same and old.get("complete") and not cfg.overwrite:
        result.reused = True
        result.n_sample = int(old.get("n_sample", 0))
    else:
        done = list(old.get("slides_done", [])) if same and not cfg.overwrite else []
        if not done:
            store.start_embedding(run_name, {**identity, "slides_done": [], "complete": False})
        result.resumed = list(done)
        result.n_sample = _embed(store, run_name, cr.labels, cfg, identity, done, progress)
        store.update_embedding_attrs(run_name, {"complete": True, "n_sample": result.n_sample})
    result.tile_map = TileMap.from_store(store, run_name)
    if cfg.grid:
        _write_mosaic(store, run_name, cfg, result, len(cr.centroids), progress)
    return result


def _embed(
    store: FeatureStore,
    run_name: str,
    labels: dict[str, np.ndarray],
    cfg: EmbedConfig,
    identity: dict[str, Any],
    done: list[str],
    progress: Progress,
) -> int:
    """Sample, fit and transform; write each unfinished slide's coordinates. Returns the sample size."""
    slide_ids = sorted(labels)
    norm = _normalizer(identity["normalize"])
    # Every tile of the run, slide by slide, row-major: (slide index, row, col, cluster).
    where = [np.nonzero(labels[sid] >= 0) for sid in slide_ids]
    slide_of = np.concatenate([np.full(len(r), i) for i, (r, _) in enumerate(where)])
    cluster = np.concatenate(
        [labels[sid][r, c] for sid, (r, c) in zip(slide_ids, where, strict=True)]
    )
    k = int(cluster.max()) + 1
    pick = stratified_sample(slide_of.astype(np.int64) * k + cluster, cfg.sample, cfg.seed)
    starts = np.r_[0, np.cumsum([len(r) for r, _ in where])]

    # Sample features, slide by slide.
    report = Throttle(progress)
    report("sample", 0, len(pick))
    feats = np.zeros((len(pick), store.dim), np.float32)
    sample_pos = {}
    got = 0
    for i, sid in enumerate(slide_ids):
        local = pick[(pick >= starts[i]) & (pick < starts[i + 1])] - starts[i]
        grid = np.full(labels[sid].shape, -1, np.int64)
        if len(local):
            r, c = where[i][0][local], where[i][1][local]
            feats[got : got + len(local)] = store.slide(sid).read_tiles(r, c)
            grid[r, c] = np.arange(got, got + len(local))
        sample_pos[sid] = grid
        got += len(local)
        report("sample", got, len(pick))
    pca = Pca.fit(norm(feats), cfg.pca_dims)
    z = pca(norm(feats))
    del feats

    progress("fit", 0, 1)
    if cfg.method == "umap":
        model: _Umap | _PcaPlane = _polled(lambda: _Umap(z, cfg), progress, "fit", 0, 1)
    else:
        model = _PcaPlane(z)
    progress("fit", 1, 1)

    total = sum(int((labels[s] >= 0).sum()) for s in slide_ids)
    placed = sum(int((labels[s] >= 0).sum()) for s in done)
    progress("transform", placed, total)
    for sid in slide_ids:
        if sid in done:
            continue
        xy = np.full((*labels[sid].shape, 2), np.nan, np.float32)
        pos = sample_pos[sid]
        r, c = np.nonzero(pos >= 0)
        xy[r, c] = model.xy[pos[r, c]]
        rest_r, rest_c = np.nonzero((labels[sid] >= 0) & (pos < 0))
        sf = store.slide(sid)
        for s in range(0, len(rest_r), _TRANSFORM_BATCH):
            rr, cc = rest_r[s : s + _TRANSFORM_BATCH], rest_c[s : s + _TRANSFORM_BATCH]
            zz = pca(norm(sf.read_tiles(rr, cc)))
            xy[rr, cc] = model.transform(zz)
            placed += len(rr)
            progress("transform", placed, total)
        placed += len(r)
        store.write_embedding(run_name, sid, xy)
        done.append(sid)
        store.update_embedding_attrs(run_name, {"slides_done": done})
        progress("transform", placed, total)
    return len(pick)


def _write_mosaic(
    store: FeatureStore,
    run_name: str,
    cfg: EmbedConfig,
    result: EmbedResult,
    k: int,
    progress: Progress,
) -> None:
    grid = mosaic_grid(result.tile_map, cfg.grid)
    thumbs, warns = read_thumbnails(store, result.tile_map, grid, cfg.cell_px, progress=progress)
    result.warnings += warns
    image = mosaic_image(grid, thumbs, cfg.cell_px)
    tinted = cluster_overlay(image, grid, cluster_colors(max(k, 1)))
    for name, img in ((MOSAIC_FILE, image), (MOSAIC_CLUSTERS_FILE, tinted)):
        result.pictures.append(store.write_run_file(run_name, name, _png(img)))
    store.update_embedding_attrs(run_name, {"mosaic": {"grid": cfg.grid, "cell_px": cfg.cell_px}})


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def report(cfg: EmbedConfig, result: EmbedResult) -> str:
    """The summary: what was mapped and the files written (warnings on stderr)."""
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    how = (
        "reused the finished map"
        if result.reused
        else f"fitted on {result.n_sample} tiles"
        + (f", resumed after {len(result.resumed)} finished slides" if result.resumed else "")
    )
    lines = [
        f"{cfg.store}: map of cluster run {result.run!r} ({result.method}): "
        f"{result.n_tiles} tiles, {how}",
        *(f"wrote {p}" for p in result.pictures),
    ]
    return "\n".join(lines)


_DESCRIPTION = (
    "The map of a cluster run: a seeded 2-D embedding (PCA then UMAP) of its tiles, stored "
    "beside the run, and a mosaic of real tiles over it."
)

_EPILOG = """\
outputs, in STORE/clusters/<RUN>/: embedding/ (attrs: the run's created time and k, tiles per
slide, the flags; slides/<id>/xy (rows, cols, 2) float32 map coordinates, NaN where no tile) and
files/map/mosaic.png, files/map/mosaic_clusters.png (the --grid x --grid cells, each showing the
tile nearest its centre; tinted by the cell's majority cluster).

the same command resumes an interrupted map, returns a finished one at once, and replaces one
made for an earlier run of the same name or other flags.

exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted.

example:
  python -m engine.embed features.zarr --run k8
  python -m engine.embed features.zarr --run k8 --method pca
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: the summary on stdout; exit status as ``engine.cli`` says."""
    return cli.main(EmbedConfig, run, argv, description=_DESCRIPTION, epilog=_EPILOG,
                    report=report, report_stream="stdout")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
