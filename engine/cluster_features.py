"""The tissue features of a store's slides, normalised and held in memory across clusterings.

A k change in the GUI fits K-means again on the same features. Reading them from
``features.zarr`` (decompressing float16 chunks, casting, L2-normalising) costs seconds for
100k tiles, several times the fit. :class:`ClusterFeatures` is an explicit cache the caller
keeps (the napari session holds one; the command line makes a fresh one per run, so a run
reads the store once instead of once for the fit and once for the assignment):
``engine.cluster.run_clustering(store, cfg, features=cache)``.

It holds one :class:`FeatureTable`, for one (store, slides, normalisation), and the pixels of
the exemplar tiles read for it. Before every use it compares a fingerprint of the store files
that decide which features a clustering reads: the store's attrs (encoder, tiling), each
slide group's and array's metadata, and every chunk file of ``done`` and ``failed`` (inode,
size, mtime in ns). Extraction writes ``done`` after the features it vouches for, and
re-extraction or ``--overwrite`` rebuilds the group, so any change to the features a
clustering would read changes the fingerprint, and the table is read again. The fingerprint
is taken before the read, so a store written during the read is read again next time.

Memory: the table is (tiles, dim) float32, at most ``max_bytes`` (default 1 GiB, the bound of
``engine.kmeans``' fitting cache); a larger selection is not held (``table`` returns None) and
the clustering streams from the store as before.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.kmeans import row_norms2
from engine.progress import Progress, Throttle, no_progress
from engine.store import FeatureStore

__all__ = ["DEFAULT_MAX_BYTES", "STAGE", "ClusterFeatures", "FeatureTable", "store_fingerprint"]

DEFAULT_MAX_BYTES = 1 << 30
STAGE = "features"
"""Progress stage of a table read: ``progress("features", tiles read, tiles)``."""
DEFAULT_TILE_CAPACITY = 1024
"""Exemplar tiles whose pixels a ``ClusterFeatures`` keeps (least recently used dropped first)."""

Normalizer = Callable[[np.ndarray], np.ndarray]


@dataclass
class FeatureTable:
    """The selected, encoded tiles of some slides, in ``FeatureStore.iter_tissue_features`` order.

    x: (n, dim) float32 normalised features. sq: (n,) float32 their squared norms
    (``engine.kmeans.row_norms2``, for the assignment's distances). rows, cols: (n,) int64
    grid positions.
    spans: {slide_id: (start, stop)} rows of ``x`` of each slide (contiguous, in slide order).
    bounds: (p + 1,) int64 starts of the chunks the store yielded, then n (assignment works
    chunk by chunk on these, exactly as the streamed path does). shapes: {slide_id: (rows,
    cols)}. pending: {slide_id: tissue tiles not encoded yet}. failed: {slide_id: (rows, cols)
    bool, selected tiles recorded unreadable}. origins: {slide_id: (rows, cols, 2) int64
    level-0 (x, y)}. attrs: {slide_id: the slide group's attrs}.
    """

    slide_ids: list[str]
    x: np.ndarray
    sq: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    spans: dict[str, tuple[int, int]]
    bounds: np.ndarray
    shapes: dict[str, tuple[int, int]]
    pending: dict[str, int]
    failed: dict[str, np.ndarray]
    origins: dict[str, np.ndarray]
    attrs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.sq.nbytes + self.rows.nbytes + self.cols.nbytes)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of each chunk the store yielded."""
        yield from zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist(), strict=True)


def _stat_tree(root: Path) -> Iterable[tuple[str, int, int, int]]:
    """(path relative to root, inode, size, mtime ns) of every file under ``root`` (none if absent)."""
    stack = [root]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(Path(e.path))
            else:
                st = e.stat(follow_symlinks=False)
                yield os.path.relpath(e.path, root), st.st_ino, st.st_size, st.st_mtime_ns


def _stat(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1, -1)
    return st.st_ino, st.st_size, st.st_mtime_ns


def store_fingerprint(store_path: str | Path, slide_ids: Sequence[str]) -> str:
    """A digest of what decides the features a clustering of ``slide_ids`` reads from the store.

    Stat only (no chunk is read): the store's ``zarr.json``; for each slide its group's and
    its ``features``/``tissue``/``origins`` metadata; every file under ``done/`` and
    ``failed/``. Milliseconds for 100k tiles.
    """
    root = Path(store_path)
    h = hashlib.sha256()
    h.update(repr(_stat(root / "zarr.json")).encode())
    for sid in slide_ids:
        group = root / "slides" / sid
        h.update(f"\0{sid}".encode())
        for name in ("zarr.json", "features/zarr.json", "tissue/zarr.json", "origins/zarr.json"):
            h.update(repr(_stat(group / name)).encode())
        for array in ("done", "failed"):
            h.update(f"\0{array}".encode())
            for entry in sorted(_stat_tree(group / array)):
                h.update(repr(entry).encode())
    return h.hexdigest()


def read_table(
    store: FeatureStore,
    slide_ids: Sequence[str],
    normalize: Normalizer,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Progress = no_progress,
) -> FeatureTable | None:
    """Read the selected, encoded tiles of ``slide_ids`` into a table (None when over ``max_bytes``).

    Reports ``progress("features", tiles read, tiles)``; a ``Cancelled`` it raises propagates.
    """
    sfs = {s: store.slide(s) for s in slide_ids}
    n_total = sum(sf.n_encoded() for sf in sfs.values())
    dim = store.dim
    if n_total * (dim * 4 + 20) > max_bytes:
        return None
    pending = {s: int(sf.pending().sum()) for s, sf in sfs.items()}
    x = np.empty((n_total, dim), np.float32)
    sq = np.empty(n_total, np.float32)
    rows = np.empty(n_total, np.int64)
    cols = np.empty(n_total, np.int64)
    bounds = [0]
    spans: dict[str, tuple[int, int]] = {}
    report = Throttle(progress)
    report(STAGE, 0, n_total)
    at = 0
    for sid in slide_ids:
        start = at
        for tf in store.iter_tissue_features([sid]):
            n = len(tf.rows)
            if at + n > len(x):  # tiles encoded since they were counted
                grow = max(n, len(x) // 4)
                x = np.concatenate([x, np.empty((grow, dim), np.float32)])
                sq = np.concatenate([sq, np.empty(grow, np.float32)])
                rows = np.concatenate([rows, np.empty(grow, np.int64)])
                cols = np.concatenate([cols, np.empty(grow, np.int64)])
            x[at : at + n] = normalize(tf.features)
            sq[at : at + n] = row_norms2(x[at : at + n])
            rows[at : at + n], cols[at : at + n] = tf.rows, tf.cols
            at += n
            bounds.append(at)
            report(STAGE, min(at, n_total), n_total)
        spans[sid] = (start, at)
    if at != len(x):
        x, sq = x[:at].copy(), sq[:at].copy()
        rows, cols = rows[:at].copy(), cols[:at].copy()
    report(STAGE, n_total, n_total)
    return FeatureTable(
        slide_ids=list(slide_ids),
        x=x,
        sq=sq,
        rows=rows,
        cols=cols,
        spans=spans,
        bounds=np.asarray(bounds, np.int64),
        shapes={s: sf.shape for s, sf in sfs.items()},
        pending=pending,
        failed={s: sf.failed for s, sf in sfs.items()},
        origins={s: sf.origins for s, sf in sfs.items()},
        attrs={s: sf.attrs for s, sf in sfs.items()},
    )


class ClusterFeatures:
    """One feature table and its exemplar pixels, kept across clusterings by whoever holds it.

    Args:
        max_bytes: the largest table kept (bytes of float32 features plus positions).
        tile_capacity: exemplar tiles whose pixels are kept.

    ``table(store, slides, normalize)`` returns the held table when the store's fingerprint,
    path, slides and normalisation are those it was read with, and reads it afresh otherwise.
    ``reads`` counts the tables read to the end (for tests and benchmarks). Not thread-safe: one clustering at a
    time per holder (the widget runs one worker at a time).
    """

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, tile_capacity: int = DEFAULT_TILE_CAPACITY
    ) -> None:
        self.max_bytes = int(max_bytes)
        self.tile_capacity = int(tile_capacity)
        self.reads = 0
        self._key: tuple | None = None
        self._table: FeatureTable | None = None
        self._tiles: OrderedDict[tuple[str, int, int], np.ndarray] = OrderedDict()

    def key(self, store: FeatureStore, slide_ids: Sequence[str], normalize: str) -> tuple:
        """What the held table must match: store path, slides, normalisation, fingerprint."""
        path = Path(store.path).resolve()
        return (str(path), tuple(slide_ids), normalize, store_fingerprint(path, slide_ids))

    def table(
        self,
        store: FeatureStore,
        slide_ids: Sequence[str],
        normalize: str,
        normalizer: Normalizer,
        *,
        progress: Progress = no_progress,
    ) -> FeatureTable | None:
        """The table of ``slide_ids`` (held or read now), or None when it is over ``max_bytes``."""
        key = self.key(store, slide_ids, normalize)
        if key == self._key:
            return self._table
        self.clear()
        table = read_table(
            store, slide_ids, normalizer, max_bytes=self.max_bytes, progress=progress
        )
        self.reads += 1
        self._key, self._table = key, table
        return table

    def tile(self, slide_id: str, row: int, col: int) -> np.ndarray | None:
        """The pixels of an exemplar tile read for the held table, or None."""
        key = (slide_id, int(row), int(col))
        pixels = self._tiles.get(key)
        if pixels is not None:
            self._tiles.move_to_end(key)
        return pixels

    def keep_tile(self, slide_id: str, row: int, col: int, pixels: np.ndarray) -> None:
        """Remember the pixels of an exemplar tile (dropped with the table)."""
        if self.tile_capacity <= 0:
            return
        self._tiles[(slide_id, int(row), int(col))] = pixels
        while len(self._tiles) > self.tile_capacity:
            self._tiles.popitem(last=False)

    def clear(self) -> None:
        """Forget the table and the tiles (the memory is freed once no result refers to it)."""
        self._key, self._table = None, None
        self._tiles.clear()

    @property
    def held(self) -> FeatureTable | None:
        """The table held now (None when none)."""
        return self._table
