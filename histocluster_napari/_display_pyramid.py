"""Pyramid levels for the viewer that never read the slide on the GUI thread.

napari slices an image layer on the GUI thread: whatever its levels' ``__getitem__`` does (a
slide read of tens to hundreds of milliseconds for a lazy level) freezes the window. Here each
level finer than the in-memory overview is a :class:`DisplayLevel`: indexing it returns at once,
with the chunks already read and, for the others, the same region of the next coarser level
scaled up (down to the overview, always in memory). The missing chunks are read in one
background thread (:class:`TileReader`, newest request first, an LRU of what was read), which
then signals ``arrived`` on the GUI thread; the widget refreshes the layer, which is sliced again,
now from memory. The effect is that of every slide viewer: a blurry view for a moment, then sharp.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from qtpy.QtCore import QObject, Signal

from histocluster_napari._slide_layers import UNREADABLE_GREY, LevelArray, level_arrays, overview
from histocluster_napari._work_queue import WorkQueue

ChunkKey = tuple[int, int, int, int]
"""(pyramid id, level index, chunk row, chunk column)."""

CACHE_BYTES = 256 * 2**20
"""Display chunks kept in memory (about 340 chunks of 512 x 512 RGB)."""
MAX_QUEUED = 256
"""Chunks waiting to be read beyond this many are dropped, oldest request first."""

_ids = itertools.count(1)


class TileReader(QObject):
    """Reads chunks of display levels in one daemon thread, the newest request first;
    ``arrived(pyramid id)`` fires on the GUI thread after each chunk is read."""

    arrived = Signal(int)

    def __init__(self, capacity_bytes: int = CACHE_BYTES) -> None:
        super().__init__()
        self._work = WorkQueue("histocluster-tiles", self._do, self._deliver, MAX_QUEUED)
        self._cond = self._work.lock
        self.capacity_bytes = int(capacity_bytes)
        self._cache: OrderedDict[ChunkKey, np.ndarray] = OrderedDict()
        self._bytes = 0

    def peek(self, key: ChunkKey) -> np.ndarray | None:
        """The chunk when it was read (marked recently used), else None."""
        with self._cond:
            chunk = self._cache.get(key)
            if chunk is not None:
                self._cache.move_to_end(key)
            return chunk

    def want(self, wanted: list[tuple[ChunkKey, Callable[[], np.ndarray]]]) -> None:
        """Read these chunks next (in this order), before anything asked for earlier."""
        self._work.put(wanted, front=True)

    def idle(self) -> bool:
        """Nothing queued and nothing being read."""
        return self._work.idle()

    def close(self) -> None:
        self._work.close()

    def _do(self, key: ChunkKey, read: Callable[[], np.ndarray]) -> np.ndarray:
        chunk = np.ascontiguousarray(read())
        with self._cond:
            self._cache[key] = chunk
            self._bytes += chunk.nbytes
            while self._bytes > self.capacity_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.nbytes
        return chunk

    def _deliver(self, key: ChunkKey, chunk: np.ndarray | None) -> None:
        if chunk is not None:  # None: unreadable (the region stays as its preview)
            self.arrived.emit(key[0])


class DisplayLevel:
    """(h, w, 3) uint8 array-like of one pyramid level whose indexing never reads the slide.

    ``coarser`` is the next coarser level (a ``DisplayLevel`` or the in-memory overview array);
    ``chunks`` (zarr style) makes napari ask for whole chunks, the unit read and cached.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(
        self,
        source: LevelArray,
        chunk: tuple[int, int],
        coarser: Any,
        reader: TileReader,
        pyramid_id: int,
        index: int,
    ) -> None:
        self.source, self.coarser, self.reader = source, coarser, reader
        self.shape = tuple(source.shape)
        self.size = math.prod(self.shape)
        self.chunks = (int(chunk[0]), int(chunk[1]), 3)
        self.pyramid_id, self.index = pyramid_id, index

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        spans, pick = [], []
        for k, n in zip(key[:2], self.shape[:2], strict=True):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step != 1:
                    raise IndexError("DisplayLevel supports unit-step slices only")
                spans.append((start, max(start, stop)))
                pick.append(slice(None))
            else:  # an integer: napari's value under the cursor
                i = int(k) % n
                spans.append((i, i + 1))
                pick.append(0)
        (y0, y1), (x0, x1) = spans
        return self.region(y0, y1, x0, x1, request=True)[(*pick, key[2])]

    def region(self, y0: int, y1: int, x0: int, x1: int, request: bool) -> np.ndarray:
        """(y1 - y0, x1 - x0, 3) pixels: read chunks as they are, the others from ``coarser``.

        ``request``: queue the missing chunks for reading (the view asked; fallbacks do not).
        """
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        if out.size == 0:
            return out
        ch, cw = self.chunks[:2]
        missing = []
        for cy in range(y0 // ch, math.ceil(y1 / ch)):
            for cx in range(x0 // cw, math.ceil(x1 / cw)):
                key = (self.pyramid_id, self.index, cy, cx)
                ty0, ty1 = max(y0, cy * ch), min(y1, (cy + 1) * ch)
                tx0, tx1 = max(x0, cx * cw), min(x1, (cx + 1) * cw)
                chunk = self.reader.peek(key)
                dst = out[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]
                if chunk is not None:
                    dst[...] = chunk[ty0 - cy * ch : ty1 - cy * ch, tx0 - cx * cw : tx1 - cx * cw]
                    continue
                dst[...] = self._from_coarser(ty0, ty1, tx0, tx1)
                if request:
                    missing.append((key, self._reader_of(cy, cx)))
        if missing:
            cy, cx = (y0 + y1) / 2 / ch, (x0 + x1) / 2 / cw  # nearest the view's centre first
            missing.sort(key=lambda m: (m[0][2] + 0.5 - cy) ** 2 + (m[0][3] + 0.5 - cx) ** 2)
            self.reader.want(missing)
        return out

    def _reader_of(self, cy: int, cx: int) -> Callable[[], np.ndarray]:
        ch, cw = self.chunks[:2]
        source, (h, w) = self.source, self.shape[:2]
        return lambda: source[cy * ch : min(h, (cy + 1) * ch), cx * cw : min(w, (cx + 1) * cw)]

    def _from_coarser(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The region scaled up (nearest) from the coarser level's pixels at hand."""
        coarse = self.coarser
        ch_, cw_ = coarse.shape[:2]
        fy, fx = ch_ / self.shape[0], cw_ / self.shape[1]
        rows = np.minimum(((np.arange(y0, y1) + 0.5) * fy).astype(np.intp), ch_ - 1)
        cols = np.minimum(((np.arange(x0, x1) + 0.5) * fx).astype(np.intp), cw_ - 1)
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        if isinstance(coarse, DisplayLevel):
            patch = coarse.region(r0, r1, c0, c1, request=False)
        else:
            patch = np.asarray(coarse[r0:r1, c0:c1])
        # Columns first, over the coarse rows only; the rows then repeat whole (contiguous
        # copies): 4x faster than rows first (a 2967 x 2220 region: 10 ms instead of 40).
        return np.take(np.take(patch, cols - c0, axis=1), rows - r0, axis=0)


def display_pyramid(slide: Any, reader: TileReader) -> list[Any]:
    """Finest first: a :class:`DisplayLevel` per level above the overview, then the overview
    (an array in memory, read here: call this in a worker, never on the GUI thread).

    A coarsest level of at most ``OVERVIEW_PX`` is read whole and is the overview; a larger one
    stays a display level above an overview shrunk from it by a power of two.
    """
    arrays = level_arrays(slide)
    coarsest = arrays[-1][0]
    try:
        small = overview(coarsest)
    except Exception:  # unreadable pixels: grey until its chunks are read (grey where broken)
        h, w = coarsest.shape[:2]
        small = np.full((min(h, 1024), min(w, 1024), 3), UNREADABLE_GREY, np.uint8)
    if small.shape == tuple(coarsest.shape):
        arrays = arrays[:-1]
    pid = next(_ids)
    levels: list[Any] = [small]
    for index in range(len(arrays) - 1, -1, -1):
        arr, chunk = arrays[index]
        levels.insert(0, DisplayLevel(arr, chunk, levels[0], reader, pid, index))
    return levels


def pyramid_id(levels: Any) -> int | None:
    """The id of a display pyramid (None for other layer data)."""
    for level in levels if isinstance(levels, Sequence) else ():
        if isinstance(level, DisplayLevel):
            return level.pyramid_id
    return None
