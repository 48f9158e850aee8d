"""``python -m engine.cluster``: mini-batch K-means over the tissue tiles of a feature store.

Fits centroids on (a sample of) the tissue tiles of the chosen slides, streamed chunk by chunk
from ``features.zarr`` (``engine.kmeans``), assigns every tissue tile of those slides, and
writes ``clusters/<run>/`` through ``FeatureStore.write_cluster_run``: centroids, per-slide
label maps (-1 outside tissue) and attrs (k, seed, algorithm, tiles used, the configuration,
per-slide tile counts and shares per cluster, the exemplar tiles). Beside them it draws
``clusters/<run>/exemplars.png`` (the tiles nearest each centroid, read back from the slides,
as in the paper's Figure 3) and ``clusters/<run>/overlays/<slide_id>.png``.

    python -m engine.cluster features.zarr --k 8 --name k8 --exemplars 3
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.errors import HistoclusterError
from engine.kmeans import assign, fit_streamed_kmeans, l2_normalize

Normalize = Literal["l2", "none"]
ALGORITHM = "minibatch-kmeans"
DEFAULT_SAMPLE = 200_000
_RUN_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass
class ClusterConfig:
    """Everything that decides a clustering run (see ``--help``)."""

    store: Path
    k: int = 8
    name: str | None = None
    slides: list[str] = field(default_factory=list)
    sample: int = DEFAULT_SAMPLE
    normalize: Normalize = "l2"
    seed: int = 0
    exemplars: int = 3
    batch_size: int = 2048
    max_passes: int = 3
    overlays: bool = True
    thumbnail_px: int = 1024
    overwrite: bool = False
    quiet: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["store"] = str(Path(self.store).resolve())
        return d


@dataclass
class Exemplar:
    """A tile near a centroid: where it is and its distance (in the clustering's feature space)."""

    cluster: int
    slide_id: str
    row: int
    col: int
    l0_x: int
    l0_y: int
    distance: float


@dataclass
class ClusterResult:
    """What ``run_clustering`` wrote: run name, centroids (k, dim), labels per slide, summary."""

    run: str
    centroids: np.ndarray
    labels: dict[str, np.ndarray]
    counts: dict[str, list[int]]
    exemplars: list[list[Exemplar]]
    n_fit: int
    n_tiles: int
    pictures: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def normalizer(kind: Normalize):
    """The feature transform of ``--normalize``: (n, dim) -> (n, dim) float32."""
    if kind == "l2":
        return l2_normalize
    if kind == "none":
        return lambda x: np.asarray(x, dtype=np.float32)
    raise ValueError(f"--normalize must be l2 or none, got {kind!r}")


def run_dir(store: Any, run: str) -> Path:
    """Directory of ``clusters/<run>`` inside the store, for the PNGs drawn beside the arrays.

    Private adapter: ``FeatureStore`` has no method for files beside a run's arrays yet.
    """
    return Path(store.path) / "clusters" / run


def default_run_name(store: Any, k: int) -> str:
    """``k<k>``, or ``k<k>-2``, ``k<k>-3``... when taken."""
    taken = set(store.cluster_runs())
    name, i = f"k{k}", 2
    while name in taken:
        name, i = f"k{k}-{i}", i + 1
    return name


def _progress(total: int, desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="tile", disable=quiet or not sys.stderr.isatty(), leave=False
    )


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


def run_clustering(store: Any, cfg: ClusterConfig) -> ClusterResult:
    """Cluster ``store`` (an open, writable ``FeatureStore``) as ``cfg`` says; see the module doc."""
    if cfg.k < 1:
        raise HistoclusterError(
            f"{store.path}: --k must be at least 1, got {cfg.k} — pass --k 2 or more"
        )
    if cfg.sample < 0 or cfg.exemplars < 0:
        raise HistoclusterError(
            f"{store.path}: --sample and --exemplars must be >= 0 — fix the value"
        )
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
    if cfg.name is not None and (not _RUN_NAME.match(cfg.name) or set(cfg.name) == {"."}):
        raise HistoclusterError(
            f"{store.path}: run name {cfg.name!r} may use only letters, digits, '.', '_' and '-' "
            "(and not only dots) — pass another --name"
        )
    run = cfg.name or default_run_name(store, cfg.k)
    if run in store.cluster_runs() and not cfg.overwrite:
        raise HistoclusterError(
            f"{store.path}: cluster run {run!r} exists — pass --overwrite or another --name"
        )
    norm = normalizer(cfg.normalize)
    warnings: list[str] = []
    pending = {s: int(store.slide(s).pending().sum()) for s in slides}
    for s, n in pending.items():
        if n:
            warnings.append(
                f"{store.path}: slide {s!r} has {n} tissue tiles not encoded yet (labelled -1) — finish python -m engine.extract"
            )
    n_tiles = store.n_tissue_tiles(slides)
    if n_tiles < cfg.k:
        raise HistoclusterError(
            f"{store.path}: {n_tiles} encoded tissue tiles in {', '.join(slides)}, fewer than k={cfg.k} — lower --k or add slides"
        )

    def source():
        for tf in store.iter_tissue_features(slides):
            yield norm(tf.features)

    n_fit = n_tiles if not cfg.sample else min(cfg.sample, n_tiles)
    bar = _progress(n_fit * cfg.max_passes, "fitting", cfg.quiet)
    fit = fit_streamed_kmeans(
        source,
        cfg.k,
        n_total=n_tiles,
        sample=cfg.sample or None,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        max_passes=cfg.max_passes,
        on_batch=bar.update,
    )
    bar.close()

    # Assignment of every tissue tile, nearest exemplars per cluster.
    k, m = cfg.k, cfg.exemplars
    labels = {s: np.full(store.slide(s).shape, -1, dtype=np.int16) for s in slides}
    counts = {s: np.zeros(k, dtype=np.int64) for s in slides}
    best_d = np.full((k, m), np.inf)
    best_id = np.full((k, m, 3), -1, dtype=np.int64)  # (slide index, row, col)
    bar = _progress(n_tiles, "assigning", cfg.quiet)
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
        bar.update(len(lab))
    bar.close()

    exemplars: list[list[Exemplar]] = []
    for c in range(k):
        row = []
        for j in range(m):
            si, r, col = (int(v) for v in best_id[c, j])
            if si < 0:
                continue
            ox, oy = (int(v) for v in store.slide(slides[si]).origins[r, col])
            row.append(Exemplar(c, slides[si], r, col, ox, oy, float(best_d[c, j])))
        exemplars.append(row)

    counts_json = {s: [int(v) for v in counts[s]] for s in slides}
    totals = np.sum([counts[s] for s in slides], axis=0)
    attrs = {
        "algorithm": ALGORITHM,
        "seed": cfg.seed,
        "normalize": cfg.normalize,
        "n_fit_tiles": int(fit.n_fit),
        "n_tiles": int(n_tiles),
        "passes": fit.passes,
        "steps": fit.steps,
        "tiles_pending": pending,
        "counts": counts_json,
        "shares": {
            s: [round(int(v) / max(1, int(counts[s].sum())), 6) for v in counts[s]] for s in slides
        },
        "cluster_tiles": [int(v) for v in totals],
        "exemplars": [[asdict(e) for e in row] for row in exemplars],
        "colors": [[int(v) for v in c] for c in _colors(k)],
        "config": {**cfg.to_json(), "name": run},
    }
    # overwrite also clears a group a killed run left incomplete (cluster_runs() lists complete ones)
    store.write_cluster_run(run, fit.centroids, labels, attrs, overwrite=True)
    result = ClusterResult(
        run, fit.centroids, labels, counts_json, exemplars, fit.n_fit, n_tiles, warnings=warnings
    )
    if m or cfg.overlays:
        draw_pictures(store, run, result, cfg)
    return result


def _colors(k: int) -> np.ndarray:
    from engine.mosaic import cluster_colors

    return cluster_colors(k)


def _open_source(store: Any, slide_id: str):
    """The slide a store's features came from, opened with the mpp used at extraction."""
    from engine.slide import open_slide

    sf = store.slide(slide_id)
    return open_slide(sf.source_path, mpp=tuple(sf.attrs["mpp"]))


def draw_pictures(store: Any, run: str, result: ClusterResult, cfg: ClusterConfig) -> None:
    """Write ``exemplars.png`` and ``overlays/<slide_id>.png`` under ``clusters/<run>``.

    A slide that cannot be read any more leaves grey exemplar cells / no overlay and a warning.
    """
    from PIL import Image

    from engine.errors import SlideError
    from engine.mosaic import exemplar_mosaic, label_overlay

    out = run_dir(store, run)
    colors = _colors(len(result.centroids))
    tiling = store.tiling
    tile_px, target_mpp = tiling.tile_px, tiling.target_mpp
    opened: dict[str, Any] = {}

    def slide_of(sid: str):
        if sid not in opened:
            try:
                opened[sid] = _open_source(store, sid)
            except SlideError as e:
                opened[sid] = None
                result.warnings.append(f"{e} (pictures of slide {sid!r} left blank)")
        return opened[sid]

    try:
        if cfg.exemplars:
            tiles = []
            for row in result.exemplars:
                cells = []
                for e in row:
                    slide = slide_of(e.slide_id)
                    cells.append(
                        slide.read_tile_at_mpp((e.l0_x, e.l0_y), target_mpp, tile_px)
                        if slide is not None
                        else np.full((tile_px, tile_px, 3), 200, np.uint8)
                    )
                tiles.append(cells)
            counts = [int(sum(c[i] for c in result.counts.values())) for i in range(len(colors))]
            path = out / "exemplars.png"
            Image.fromarray(exemplar_mosaic(tiles, colors, counts)).save(path)
            result.pictures.append(path)
        if cfg.overlays:
            (out / "overlays").mkdir(exist_ok=True)
            for sid, lab in result.labels.items():
                slide = slide_of(sid)
                if slide is None:
                    continue
                attrs = store.slide(sid).attrs
                thumb = slide.thumbnail(cfg.thumbnail_px)
                img = label_overlay(thumb, lab, attrs["stride_l0"], attrs["dimensions"], colors)
                path = out / "overlays" / f"{sid}.png"
                Image.fromarray(img).save(path)
                result.pictures.append(path)
    finally:
        for slide in opened.values():
            if slide is not None:
                slide.close()


_EPILOG = """\
outputs, in STORE/clusters/<RUN>/: centroids (k, dim), slides/<id>/labels (rows, cols; -1
outside tissue), attrs (k, seed, algorithm, tiles fitted/assigned, per-slide tile counts and
shares per cluster, exemplar tiles, colours, the configuration), exemplars.png (the tiles
nearest each centroid, read from the slides) and overlays/<slide_id>.png.

the centroids are fitted on at most --sample tiles drawn at random from all chosen slides,
streamed chunk by chunk (memory stays bounded); every tissue tile is then assigned.

example:
  python -m engine.cluster features.zarr --k 8 --name k8 --exemplars 3
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.cluster",
        description="Mini-batch K-means over the tissue tiles of a feature store (paper section 4.4); "
        "writes clusters/<RUN>/ in the store with exemplars.png and overlays/<slide>.png.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="the features.zarr written by python -m engine.extract")
    p.add_argument("--k", type=int, default=8, help="number of clusters (default: 8)")
    p.add_argument(
        "--name",
        default=None,
        help="run name, letters/digits/._- (default: k<K>, k<K>-2... when taken)",
    )
    p.add_argument(
        "--slides",
        nargs="+",
        default=[],
        metavar="ID",
        help="slide ids to cluster (default: all in the store)",
    )
    p.add_argument(
        "--sample",
        type=int,
        default=DEFAULT_SAMPLE,
        help=f"at most this many tissue tiles, drawn at random, fit the centroids; 0 = all (default: {DEFAULT_SAMPLE}); every tile is assigned regardless",
    )
    p.add_argument(
        "--normalize",
        choices=["l2", "none"],
        default="l2",
        help="feature transform before clustering (default: l2, i.e. cosine geometry)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of sampling, k-means++ and batch order; same seed, same clusters (default: 0)",
    )
    p.add_argument(
        "--exemplars",
        type=int,
        default=3,
        help="tiles nearest each centroid shown in exemplars.png; 0 = no mosaic (default: 3)",
    )
    p.add_argument(
        "--batch-size", type=int, default=2048, help="tiles per mini-batch update (default: 2048)"
    )
    p.add_argument(
        "--max-passes",
        type=int,
        default=3,
        help="passes over the fitting tiles, fewer when centroids settle (default: 3)",
    )
    p.add_argument(
        "--no-overlays",
        dest="overlays",
        action="store_false",
        help="skip the overlay PNG per slide",
    )
    p.add_argument(
        "--thumbnail-px",
        type=int,
        default=1024,
        help="longest side of the overlay PNGs (default: 1024)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing run of the same --name"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary table")
    return p


def parse_config(argv: list[str] | None = None) -> ClusterConfig:
    ns = build_parser().parse_args(argv)
    return ClusterConfig(**vars(ns))


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


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 on success, 1 with a one-line ``error: ...`` on stderr."""
    from engine.store import FeatureStore

    cfg = parse_config(argv)
    try:
        store = FeatureStore.open(cfg.store, mode="r+")
        result = run_clustering(store, cfg)
    except HistoclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not cfg.quiet:
        print(
            f"{cfg.store}: cluster run {result.run!r}: k={len(result.centroids)}, fitted on {result.n_fit} of {result.n_tiles} tissue tiles"
        )
        print(format_summary(result))
        for p in result.pictures:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
