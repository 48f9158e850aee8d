"""The extraction plan: a store's pending tiles cut into batches, chunk by chunk, split over ranks.

A batch never spans zarr chunks and a given tile always lands in the same batch (the cut does not
depend on what is done), so a resumed or multi-process run computes bit-identical features.
Torch-free: the plan is made while torch may still be importing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.slide_job import SlideJob
from engine.store import Block, FeatureStore

__all__ = ["Plan", "chunk_batches", "make_plan"]


@dataclass
class Plan:
    """This rank's batches. Batch i holds tiles ``rows/cols[start[i]:stop[i]]`` of chunk ``chunk[i]``."""

    jobs: list[SlideJob]
    rows: np.ndarray  # (tiles,) int32 tile rows, grouped by batch
    cols: np.ndarray  # (tiles,) int32
    slide: np.ndarray  # (batches,) int32 index into jobs
    chunk: np.ndarray  # (batches, 2) int32 (chunk row, chunk col)
    start: np.ndarray  # (batches,) int64
    stop: np.ndarray  # (batches,) int64
    last: np.ndarray  # (batches,) bool: the last batch of its chunk
    already_done: int = 0
    already_failed: int = 0  # unreadable tiles recorded earlier and not retried

    @property
    def n_tiles(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        return len(self.start)


def chunk_batches(selected: np.ndarray, done: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of one chunk: its selected tiles in row-major order, cut every ``batch_size``,
    then the done ones dropped (empty batches too). Returns flat indices into the chunk.

    The cut does not depend on what is done, so a tile is always encoded with the same companions.
    """
    flat = np.flatnonzero(selected)
    pending = ~done.ravel()
    out = []
    for s in range(0, len(flat), batch_size):
        group = flat[s : s + batch_size]
        group = group[pending[group]]
        if len(group):
            out.append(group)
    return out


def make_plan(
    store: FeatureStore,
    slide_ids: Sequence[str],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    retry_failed: bool = False,
    reader: str = "openslide",
) -> Plan:
    """Split the pending chunks of ``slide_ids`` over ranks (balanced by tiles, deterministic)
    and cut this rank's chunks into batches. Tiles recorded as unreadable are left out unless
    ``retry_failed`` (they keep their place in the batch cut either way)."""
    chunks: list[tuple[int, Block, list[np.ndarray]]] = []
    jobs: list[SlideJob] = []
    already_done = already_failed = 0
    tiling = store.tiling
    for sid in slide_ids:
        sf = store.slide(sid)
        selected = sf.selected
        done = sf.done
        already_done += int((selected & done).sum())
        skip = done
        if not retry_failed:
            failed = sf.failed
            already_failed += int(failed.sum())
            skip = done | failed
        origins = sf.origins
        attrs = sf.attrs
        jobs.append(
            SlideJob(
                sid,
                attrs["source_path"],
                (float(attrs["mpp"][0]), float(attrs["mpp"][1])),
                tiling.target_mpp,
                tiling.tile_px,
                origins[0, :, 0].copy(),
                origins[:, 0, 1].copy(),
                reader,
            )
        )
        for block in sf.blocks():
            sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
            batches = chunk_batches(selected[sl], skip[sl], batch_size)
            if batches:
                chunks.append((len(jobs) - 1, block, batches))
    load = np.zeros(world_size, dtype=np.int64)
    mine: list[tuple[int, Block, list[np.ndarray]]] = []
    for item in chunks:
        target = int(np.argmin(load))  # ties -> lowest rank, identical on every rank
        load[target] += sum(len(b) for b in item[2])
        if target == rank:
            mine.append(item)
    rows, cols, slide, chunk, start, stop, last = [], [], [], [], [], [], []
    pos = 0
    for job_i, block, batches in mine:
        w = block.c1 - block.c0
        for bi, b in enumerate(batches):
            rows.append(block.r0 + b // w)
            cols.append(block.c0 + b % w)
            slide.append(job_i)
            chunk.append(block.index)
            start.append(pos)
            pos += len(b)
            stop.append(pos)
            last.append(bi == len(batches) - 1)
    cat = (
        (lambda xs: np.concatenate(xs).astype(np.int32))
        if rows
        else (lambda xs: np.zeros(0, np.int32))
    )
    return Plan(
        jobs,
        cat(rows),
        cat(cols),
        np.asarray(slide, dtype=np.int32),
        np.asarray(chunk, dtype=np.int32).reshape(-1, 2),
        np.asarray(start, dtype=np.int64),
        np.asarray(stop, dtype=np.int64),
        np.asarray(last, dtype=bool),
        already_done,
        already_failed,
    )
