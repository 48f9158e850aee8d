"""Which tiles the gallery shows for a cluster, and their pixels (no Qt; run in a worker).

The gallery is where a user decides what a cluster is, so it shows the cluster's tiles nearest
its centroid *and* a random sample of the rest, drawn from as many slides as possible:

1. nearest: each slide's tiles of the cluster sorted by distance to the centroid; round ``r``
   takes every slide's ``r``-th nearest tile (at most ``per_slide`` rounds), rounds in order and
   each round by distance; the first ``n_nearest`` of that order;
2. the rest: all other tiles of the cluster in a seeded random order, then interleaved slide by
   slide (one tile of each slide in turn), so any page of the gallery spans many slides.

Distances are those of the clustering (``engine.cluster``'s feature transform: l2-normalised
features unless the run says ``normalize: none``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from engine.cluster import normalizer
from engine.progress import Progress, no_progress
from engine.slide import SlideCache
from engine.store import FeatureStore
from histocluster_napari._session import read_tile

N_NEAREST = 24
PER_SLIDE = 3
PAGE = 24
"""Tiles loaded at a time: the first page on selecting a cluster, then one per scroll to the end."""
THUMB_PX = 96


@dataclass(frozen=True)
class GalleryTile:
    """One tile of the gallery: where it is, its distance to the centroid, which part it is from."""

    slide_id: str
    row: int
    col: int
    distance: float
    nearest: bool
    note: str = ""
    """What the tooltip says instead of the cluster-gallery wording (e.g. a review's margin)."""


def gallery_order(
    store: FeatureStore,
    run: str,
    cluster: int,
    labels: Mapping[str, np.ndarray],
    n_nearest: int = N_NEAREST,
    per_slide: int = PER_SLIDE,
    seed: int = 0,
) -> list[GalleryTile]:
    """Every tile of ``cluster`` in gallery order (see the module doc).

    Args:
        labels: {slide_id: (rows, cols) cluster labels of the run, -1 outside tissue}.
    """
    data = store.read_cluster_run(run, slide_ids=[])
    centroid = np.asarray(data.centroids[cluster], np.float32)
    norm = normalizer(data.attrs.get("normalize", "l2"))
    per: dict[str, list[GalleryTile]] = {}
    for sid in sorted(labels):
        rows, cols = np.nonzero(np.asarray(labels[sid]) == cluster)
        if not len(rows):
            continue
        feats = norm(store.slide(sid).read_tiles(rows, cols))
        dist = np.linalg.norm(feats - centroid[None, :], axis=1)
        order = np.lexsort((cols, rows, dist))
        per[sid] = [
            GalleryTile(sid, int(rows[i]), int(cols[i]), float(dist[i]), False) for i in order
        ]
    nearest: list[GalleryTile] = []
    for r in range(per_slide):
        round_r = sorted(
            (tiles[r] for tiles in per.values() if len(tiles) > r), key=lambda t: t.distance
        )
        nearest.extend(round_r)
    nearest = nearest[:n_nearest]
    chosen = {(t.slide_id, t.row, t.col) for t in nearest}
    rng = np.random.default_rng(seed)
    rest: dict[str, list[GalleryTile]] = {}
    for sid, tiles in per.items():
        left = [t for t in tiles if (t.slide_id, t.row, t.col) not in chosen]
        rest[sid] = [left[i] for i in rng.permutation(len(left))]
    spread: list[GalleryTile] = []
    depth = max((len(v) for v in rest.values()), default=0)
    for r in range(depth):
        spread.extend(tiles[r] for tiles in rest.values() if len(tiles) > r)
    return [GalleryTile(t.slide_id, t.row, t.col, t.distance, True) for t in nearest] + spread


def read_gallery(
    store_path: str,
    tiles: Sequence[GalleryTile],
    px: int = THUMB_PX,
    progress: Progress = no_progress,
) -> Iterator[tuple[GalleryTile, np.ndarray]]:
    """(tile, (px, px, 3) uint8 pixels) for each of ``tiles``, read from the slides in turn."""
    store = FeatureStore.open(store_path)
    progress("gallery", 0, len(tiles))
    with SlideCache(capacity=8) as slides:
        for i, t in enumerate(tiles):
            yield t, read_tile(store, slides, t.slide_id, t.row, t.col, px)
            progress("gallery", i + 1, len(tiles))
