"""Similar tiles: exact cosine top-k over every tissue tile of a feature store, chunk by chunk.

``similar_tiles(store, vector, top)`` is the API (the napari widget's "find similar");
``run(QueryConfig(...))`` / ``python -m engine.query features.zarr --slide ID --row R --col C
--top 20`` the command. Memory holds one chunk of features and the current top-k, whatever the
store's size. Progress stage: ``query`` (tiles compared).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from engine import cli
from engine.cli import option
from engine.errors import HistoclusterError
from engine.files import atomic_write_json
from engine.kmeans import l2_normalize
from engine.progress import Progress, Throttle, no_progress
from engine.store import FeatureStore
from engine.tile_ref import TileRef

__all__ = ["Hit", "QueryConfig", "QueryResult", "main", "run", "similar_tiles", "tile_vector"]


@dataclass(frozen=True, slots=True)
class Hit(TileRef):
    """A tile and its cosine similarity to the query."""

    similarity: float


def similar_tiles(
    store: FeatureStore,
    vector: np.ndarray,
    top: int = 20,
    slide_ids: Sequence[str] | None = None,
    exclude: Sequence[tuple[str, int, int]] = (),
    *,
    progress: Progress = no_progress,
) -> list[Hit]:
    """The ``top`` tissue tiles most similar to ``vector`` by cosine similarity, most similar first.

    Args:
        store: an open ``FeatureStore``.
        vector: (dim,) query feature (any scale; only its direction matters).
        top: number of hits.
        slide_ids: slides to search (default: all in the store).
        exclude: (slide_id, row, col) tiles to leave out (e.g. the query tile itself).
        progress: ``progress("query", tiles compared, tiles to compare)``, at least every 0.2 s;
            a ``Cancelled`` it raises stops the search.
    Returns:
        Up to ``top`` hits; ties keep store order (slide, then chunk, then row-major).
    """
    q = np.asarray(vector, dtype=np.float32).reshape(-1)
    if q.shape[0] != store.dim:
        raise HistoclusterError(
            f"{store.path}: query vector has {q.shape[0]} values, the store's features {store.dim} — use a feature of this store's encoder"
        )
    if not np.isfinite(q).all() or not np.any(q):
        raise HistoclusterError(
            f"{store.path}: query vector is zero or not finite — give a real feature vector"
        )
    q = q / np.linalg.norm(q)
    excluded = {(s, int(r), int(c)) for s, r, c in exclude}
    best_sim = np.zeros(0, dtype=np.float32)
    best_key = np.zeros((0, 4), dtype=np.int64)  # (order, slide index, row, col)
    ids = list(slide_ids) if slide_ids is not None else store.slide_ids()
    total = store.n_tissue_tiles(ids)
    report = Throttle(progress)
    report("query", 0, total)
    order = 0
    for tf in store.iter_tissue_features(ids):
        sims = l2_normalize(tf.features) @ q
        si = ids.index(tf.slide_id)
        keys = np.stack(
            [order + np.arange(len(sims)), np.full(len(sims), si), tf.rows, tf.cols], axis=1
        )
        order += len(sims)
        drop = np.zeros(len(sims), dtype=bool)
        for s, r, c in excluded:
            if s == tf.slide_id:
                drop |= (tf.rows == r) & (tf.cols == c)
        if drop.any():
            sims, keys = sims[~drop], keys[~drop]
        if len(sims) > top:
            part = np.argpartition(-sims, top - 1)[:top]
            sims, keys = sims[part], keys[part]
        best_sim = np.concatenate([best_sim, sims])
        best_key = np.concatenate([best_key, keys])
        if len(best_sim) > top:
            sel = np.lexsort((best_key[:, 0], -best_sim))[:top]
            best_sim, best_key = best_sim[sel], best_key[sel]
        report("query", order, total)
    sel = np.lexsort((best_key[:, 0], -best_sim))[:top]
    hits = []
    for s, (_, si, r, c) in zip(best_sim[sel], best_key[sel], strict=True):
        sid = ids[int(si)]
        x, y = (int(v) for v in store.slide(sid).origins[int(r), int(c)])
        hits.append(Hit(sid, int(r), int(c), x, y, float(s)))
    return hits


def tile_vector(store: FeatureStore, slide_id: str, row: int, col: int) -> np.ndarray:
    """(dim,) float32 feature of one encoded tissue tile; ``HistoclusterError`` otherwise."""
    sf = store.slide(slide_id)
    rows, cols = sf.shape
    if not (0 <= row < rows and 0 <= col < cols):
        raise HistoclusterError(
            f"{store.path}: tile ({row}, {col}) is outside slide {slide_id!r} ({rows} rows x {cols} cols) — pick --row/--col inside the grid"
        )
    if not (sf.selected[row, col] and bool(sf.done[row, col])):
        raise HistoclusterError(
            f"{store.path}: tile ({row}, {col}) of slide {slide_id!r} is not an encoded tissue tile — pick a tile inside tissue"
        )
    return sf.read_tiles(np.array([row]), np.array([col]))[0]


@dataclass(frozen=True)
class QueryConfig:
    """``python -m engine.query`` arguments (see ``--help``)."""

    store: Path = option(
        positional=True, parse=Path, help="the features.zarr written by python -m engine.extract"
    )
    slide: str = option(help="slide id of the query tile")
    row: int = option(help="tile-grid row of the query tile")
    col: int = option(help="tile-grid column of the query tile")
    top: int = option(20, help="number of similar tiles")
    slides: tuple[str, ...] = option(
        default_factory=tuple,
        metavar="ID",
        show_default=False,
        help="search only these slides (default: all)",
    )
    include_self: bool = option(False, help="keep the query tile itself among the hits")
    out: Path | None = option(
        None, parse=Path, help="also write the configuration and hits as JSON to this file"
    )
    quiet: bool = option(False, help="print nothing (use with --out)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        object.__setattr__(self, "slides", tuple(self.slides))
        if self.out is not None:
            object.__setattr__(self, "out", Path(self.out))


@dataclass
class QueryResult:
    """The hits, most similar first, and the file they were written to (``--out``), if any."""

    hits: list[Hit]
    out: Path | None = None


def run(cfg: QueryConfig, *, progress: Progress = no_progress) -> QueryResult:
    """The ``cfg.top`` tiles most similar to tile (``cfg.row``, ``cfg.col``) of ``cfg.slide``."""
    if cfg.top < 1:
        raise HistoclusterError(f"{cfg.store}: --top must be at least 1 — pass --top 20")
    store = FeatureStore.open(cfg.store)
    vec = tile_vector(store, cfg.slide, cfg.row, cfg.col)
    exclude = [] if cfg.include_self else [(cfg.slide, cfg.row, cfg.col)]
    hits = similar_tiles(store, vec, cfg.top, cfg.slides or None, exclude, progress=progress)
    if cfg.out is not None:
        record = {
            **{f.name: getattr(cfg, f.name) for f in fields(cfg)},
            "store": str(Path(cfg.store).resolve()),
            "slides": list(cfg.slides),
            "out": str(cfg.out),
            "hits": [asdict(h) for h in hits],
        }
        try:
            atomic_write_json(cfg.out, record)
        except OSError as e:
            raise HistoclusterError(
                f"{cfg.out}: cannot write ({e.strerror or e}) — choose a writable --out"
            ) from e
    return QueryResult(hits, cfg.out)


def report(cfg: QueryConfig, result: QueryResult) -> str:
    """The hits as a tab-separated table (stdout)."""
    lines = ["rank\tslide_id\trow\tcol\tl0_x\tl0_y\tsimilarity"]
    for i, h in enumerate(result.hits, 1):
        lines.append(f"{i}\t{h.slide_id}\t{h.row}\t{h.col}\t{h.l0_x}\t{h.l0_y}\t{h.similarity:.4f}")
    return "\n".join(lines)


_DESCRIPTION = (
    "The tissue tiles most similar (cosine, exact) to one tile, across the slides of a feature "
    "store."
)
_EPILOG = "exit status: 0 done, 2 bad input (one line on stderr), 130 interrupted."


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: a table of hits on stdout; exit status as ``engine.cli`` says."""
    return cli.main(QueryConfig, run, argv, description=_DESCRIPTION, epilog=_EPILOG,
                    report=report, report_stream="stdout",
                    interrupted_hint="nothing was written; run the same command again")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
