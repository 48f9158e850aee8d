"""The files of one ``engine.export``: which tiles, in which order, at which geometry.

Which class a tile goes to is a :class:`~engine.export_choice.TileChoice`'s decision; this
module orders the chosen tiles (nearest their centroid first, then the most probable; or seeded
random), caps them, and turns grid tiles into level-0 regions and file names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.export_choice import TileChoice
from engine.kmeans import l2_normalize
from engine.progress import Progress, no_progress
from engine.store import FeatureStore
from engine.tile_ref import TileRef
from engine.tiling import Tiling

__all__ = [
    "ExportPlan",
    "PlannedTile",
    "plan_export",
    "tile_boxes",
    "tile_geometry",
]


@dataclass(frozen=True, slots=True)
class PlannedTile(TileRef):
    """One file to write: the tile, ``path`` relative to DIR ('/'-separated), its class, cluster
    and level-0 region size.

    ``distance`` to the tile's cluster centroid and ``prob`` of its class: NaN when unknown.
    """

    path: str
    cls: str
    cluster: int
    l0_w: int
    l0_h: int
    distance: float
    prob: float = float("nan")


@dataclass
class ExportPlan:
    """The files of one export and what writing them needs.

    ``slides`` {slide_id: slide attrs from the store}; ``tile_px``/``mpp`` of the written tiles.
    """

    tiles: list[PlannedTile]
    slides: dict[str, dict[str, Any]]
    tile_px: int
    mpp: float


def tile_geometry(tiling: Tiling, tile_px: int | None, mpp: float | None) -> tuple[int, float]:
    """(tile_px, mpp) of the exported tiles from the store's tiling and the optional overrides.

    Neither: the grid tile. ``tile_px`` alone keeps the physical size at another pixel size;
    ``mpp`` alone keeps it at another resolution; both: a region of tile_px x mpp micrometres.
    """
    store_px, store_mpp = tiling.tile_px, tiling.target_mpp
    side_um = store_px * store_mpp
    if tile_px is None and mpp is None:
        return store_px, store_mpp
    if mpp is None:
        return int(tile_px), side_um / int(tile_px)  # type: ignore[arg-type]
    if tile_px is None:
        return max(1, round(side_um / mpp)), float(mpp)
    return int(tile_px), float(mpp)


def tile_boxes(
    rows: np.ndarray,
    cols: np.ndarray,
    stride_l0: Sequence[float],
    tile_l0: Sequence[float],
    region_l0: Sequence[float],
) -> np.ndarray:
    """(n, 4) int64 level-0 (x0, y0, x1, y1) of regions of ``region_l0`` centred on grid tiles.

    Corners are rounded from the continuous grid position, so with region == stride neighbours
    share edges exactly (x1 of one tile is x0 of the next) and the union has no slivers.
    """
    rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
    fx = cols * stride_l0[0] + (tile_l0[0] - region_l0[0]) / 2
    fy = rows * stride_l0[1] + (tile_l0[1] - region_l0[1]) / 2
    return np.stack(
        [np.rint(fx), np.rint(fy), np.rint(fx + region_l0[0]), np.rint(fy + region_l0[1])], axis=1
    ).astype(np.int64)


def plan_export(
    store: FeatureStore,
    run: str | None,
    choice: TileChoice,
    slides: Sequence[str],
    *,
    tile_px: int,
    mpp: float,
    ext: str = "png",
    max_per_cluster: int = 0,
    order: str = "nearest",
    seed: int = 0,
    progress: Progress = no_progress,
) -> ExportPlan:
    """The files of an export of ``run``'s tiles through ``choice``, over ``slides``.

    Tiles are grouped by (class, cluster): a class's own clusters first, in its order, then
    clusters whose tiles were moved into it (cluster -1: tiles outside the run's labels, whose
    distance is NaN). Within a group tiles go nearest the cluster centroid first, then the most
    probable (``choice.probability``; ties by slide, row, col), or in a seeded random order;
    ``max_per_cluster`` (0 = all) caps each group. ``run`` None (export by prediction): every
    tile's label is -1, so each class is one group, most probable first.
    Reports ``progress("plan", slides done, slides)``.
    """
    if run is None:
        centroids, normalize, run_slides = np.zeros((0, store.dim), np.float32), "l2", set()
    else:
        stored = store.read_cluster_run(run, slide_ids=[])
        centroids = np.asarray(stored.centroids, dtype=np.float32)
        normalize = stored.attrs.get("normalize", "l2")
        run_slides = set(stored.attrs.get("slides", []))
    classes = list(choice.classes)
    parts: list[tuple[np.ndarray, ...]] = []
    facts: dict[str, dict[str, Any]] = {}
    for si, sid in enumerate(slides):
        progress("plan", si, len(slides))
        sf = store.slide(sid)
        attrs = sf.attrs
        facts[sid] = attrs
        if sid in run_slides:
            labels = store.read_cluster_labels(run, sid).astype(np.int64)
        else:  # a slide outside the run (or no run), holding chosen tiles
            labels = np.full(sf.shape, -1, np.int64)
        labels = np.where(labels < len(centroids), labels, -1)
        cls = np.asarray(choice.assign(sid, labels), dtype=np.int16)
        rows, cols = np.nonzero(cls >= 0)
        if len(rows) == 0:
            continue
        lab = labels[rows, cols]
        prob = np.asarray(choice.probability(sid, rows, cols), dtype=np.float64)
        dist = np.full(len(rows), np.nan)  # no centroid for a tile outside the run's labels
        known = np.flatnonzero(lab >= 0)
        if len(known):
            feats = sf.read_tiles(rows[known], cols[known])
            if normalize == "l2":
                feats = l2_normalize(feats)
            dist[known] = np.linalg.norm(feats - centroids[lab[known]], axis=1)
        slide_mpp = attrs["mpp"]
        region = (tile_px * mpp / slide_mpp[0], tile_px * mpp / slide_mpp[1])
        boxes = tile_boxes(rows, cols, attrs["stride_l0"], attrs["tile_l0"], region)
        parts.append(
            (
                np.full(len(rows), si), rows, cols, cls[rows, cols].astype(np.int64), lab, dist,
                prob, boxes,
            )
        )  # fmt: skip
    progress("plan", len(slides), len(slides))
    if not parts:
        return ExportPlan([], facts, tile_px, mpp)
    si, rows, cols, cls, lab, dist, prob, boxes = (
        np.concatenate(p) for p in zip(*parts, strict=True)
    )
    rng = np.random.default_rng(seed)
    tiles: list[PlannedTile] = []
    for ci, klass in enumerate(classes):
        mine = cls == ci
        own = list(klass.clusters)
        moved = sorted(set(np.unique(lab[mine]).tolist()) - set(own))
        groups = own + [c for c in moved if c >= 0] + [c for c in moved if c < 0]
        for c in groups:
            idx = np.flatnonzero(mine & (lab == c))
            if len(idx) == 0:
                continue
            idx = idx[np.lexsort((cols[idx], rows[idx], si[idx], -prob[idx], dist[idx]))]
            if order == "random":
                idx = idx[rng.permutation(len(idx))]
            if max_per_cluster:
                idx = idx[:max_per_cluster]
            for i in idx.tolist():
                sid = slides[int(si[i])]
                x0, y0, x1, y1 = (int(v) for v in boxes[i])
                tiles.append(
                    PlannedTile(
                        sid,
                        int(rows[i]),
                        int(cols[i]),
                        x0,
                        y0,
                        f"{klass.name}/{sid}_{x0}_{y0}.{ext}",
                        klass.name,
                        int(c),
                        x1 - x0,
                        y1 - y0,
                        float(dist[i]),
                        float(prob[i]),
                    )
                )
    return ExportPlan(tiles, facts, tile_px, mpp)
