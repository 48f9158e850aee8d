"""Writing encoded batches into a feature store one whole zarr chunk at a time.

Features first, then done flags, then unreadable-tile flags: a run killed at any moment leaves
only whole chunks, each marked done only once its features are on disk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.store import Block, FeatureStore, SlideFeatures

__all__ = ["ChunkWriter"]


@dataclass
class _OpenChunk:
    """A chunk being filled: its features (h, w, dim), done and failed (h, w) buffers."""

    sf: SlideFeatures
    block: Block
    features: np.ndarray
    done: np.ndarray
    failed: np.ndarray
    failed_changed: bool
    since: float

    def write(self) -> None:
        """Features, then done flags, then (if any changed) the unreadable-tile flags."""
        self.sf.write_block(self.block, self.features, self.done)
        if self.failed_changed:
            self.sf.write_failed_block(self.block, self.failed)
            self.failed_changed = False
        self.since = time.monotonic()


class ChunkWriter:
    """Collects a chunk's features and writes it whole: features first, then done flags, then
    the flags of its unreadable tiles.

    A chunk is written when its last batch arrives, and also every ``flush_every_s`` seconds
    while it is in progress (so a slow chunk loses little when killed).
    """

    def __init__(self, store: FeatureStore, flush_every_s: float) -> None:
        self.store = store
        self.flush_every_s = flush_every_s
        self._open: dict[tuple[str, int, int], _OpenChunk] = {}

    def add(
        self,
        slide_id: str,
        chunk: tuple[int, int],
        rows: np.ndarray,
        cols: np.ndarray,
        feats: np.ndarray,
        last: bool,
        failed: np.ndarray | None = None,
    ) -> None:
        """Place ``feats`` (B, dim) of tiles ``rows``, ``cols`` (B,) into their chunk's buffer;
        tiles where ``failed`` (B,) bool is true are recorded as unreadable instead."""
        key = (slide_id, int(chunk[0]), int(chunk[1]))
        c = self._open.get(key)
        if c is None:
            sf = self.store.slide(slide_id)
            block = sf.block_at(*chunk)
            f, d = sf.read_block(block)
            fl = sf.read_failed_block(block)
            c = self._open[key] = _OpenChunk(
                sf, block, f.copy(), d.copy(), fl.copy(), False, time.monotonic()
            )
        r, k = rows - c.block.r0, cols - c.block.c0
        ok = np.ones(len(rows), bool) if failed is None else ~failed
        c.features[r[ok], k[ok]] = feats[ok].astype(np.float16)
        c.done[r[ok], k[ok]] = True
        new_failed = ~ok
        if c.failed[r, k].any() or new_failed.any():
            c.failed[r, k] = new_failed
            c.failed_changed = True
        if last:
            c.write()
            del self._open[key]
        elif time.monotonic() - c.since >= self.flush_every_s:
            c.write()

    def flush(self, slide_id: str | None = None) -> None:
        """Write every open chunk (of one slide, or all)."""
        for key in [k for k in self._open if slide_id is None or k[0] == slide_id]:
            self._open.pop(key).write()
