"""Per-slide progress of an extraction, worked out from ``engine.extract``'s overall reports (no Qt).

In one process (as in the GUI) ``engine.extract.make_plan`` encodes the pending tiles of its
slides in the order given, slide after slide, and reports ``("encode", seen, total)`` after each
batch. With each slide's pending tiles (selected, neither encoded nor recorded unreadable),
read from the store when encoding starts, ``seen`` tells how far each slide is. When the counts
do not add up to ``total`` (a slide that failed to open, another process at work), no per-slide
figures are given rather than wrong ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.errors import HistoclusterError
from engine.slide import slide_id
from engine.store import FeatureStore

SlideCounts = dict[str, tuple[int, int]]
"""slide id -> (tiles done, tiles to do) of the slides with work in this extraction."""


def pending_tiles(store_path: Path, slide_ids: Sequence[str]) -> dict[str, int]:
    """Tiles each slide still has to encode (selected, not done, not failed), in order."""
    store = FeatureStore.open(store_path)
    out = {}
    for sid in slide_ids:
        if sid in store:
            sf = store.slide(sid)
            out[sid] = int((sf.selected & ~sf.done & ~np.asarray(sf.failed, bool)).sum())
    return out


class SlideProgress:
    """Call with each ``(stage, done, total)`` report (in the worker); returns the slides' counts
    when they changed, else None."""

    def __init__(self, store_path: Path, slides: Sequence[Path]) -> None:
        self.store_path = Path(store_path)
        self.slide_ids = [slide_id(p) for p in slides]
        self._pending: dict[str, int] | None = None
        self._last: SlideCounts | None = None

    def __call__(self, stage: str, done: int, total: int) -> SlideCounts | None:
        if stage != "encode":
            return None
        if self._pending is None:
            try:
                pending = pending_tiles(self.store_path, self.slide_ids)
            except (HistoclusterError, OSError, KeyError, ValueError):
                pending = {}
            ok = sum(pending.values()) == total
            self._pending = {s: n for s, n in pending.items() if n > 0} if ok else {}
        counts = split(self._pending, done)
        if counts == self._last:
            return None
        self._last = counts
        return counts


def split(pending: dict[str, int], seen: int) -> SlideCounts:
    """``seen`` tiles of work spread over the slides in order: (done, to do) of each."""
    out, left = {}, int(seen)
    for sid, n in pending.items():
        here = min(n, max(0, left))
        out[sid] = (here, n)
        left -= here
    return out
