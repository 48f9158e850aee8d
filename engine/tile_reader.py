"""Reading the tiles of planned batches in DataLoader workers, salvaging what can be read.

A batch is read in one go; when any read fails, the batch is read again tile by tile, reopening
the slide before the retry and after each failed tile (OpenSlide latches a read error on its
handle: every later read of that handle fails the same way). So one damaged tile costs only
itself: the batch comes back with every readable tile and a mask of the unreadable ones.

Failures that are not the slide's (a worker that died, or one that could not hand its batch to
the main process: shared memory or the file-size limit) end the run with one
:class:`~engine.errors.HistoclusterError` instead of a traceback or a hang.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from engine.errors import HistoclusterError, one_line
from engine.heap import default_heap
from engine.jpeg_tiles import JpegTileReader
from engine.slide import Slide, SlideCache
from engine.slide_job import READERS, SlideJob

__all__ = [
    "READERS",
    "BatchPlan",
    "SlideJob",
    "TileBatches",
    "TileSources",
    "read_batch",
    "read_batches",
]

_OPEN_SLIDES_PER_WORKER = 4
_WHITE = 255


class TileSources:
    """Open slides (a :class:`SlideCache`) and, where the job's reader allows, a
    :class:`~engine.jpeg_tiles.JpegTileReader` that decodes a JPEG-tiled TIFF's own tiles at
    reduced size. ``auto`` uses the JPEG reader where it fits the tile scale, else OpenSlide;
    ``jpeg`` insists (a slide it cannot serve fails); ``openslide`` never uses it; ``device``
    (bytes decoded on the encoder's device, :mod:`engine.device_tiles`) reads here as ``auto``
    the slides that path does not serve.
    Picklable: a worker process starts empty.
    """

    def __init__(self, capacity: int) -> None:
        self.slides = SlideCache(capacity)
        self._jpeg: dict[str, JpegTileReader | None] = {}

    def slide(self, job: SlideJob) -> Slide:
        return self.slides.get(job.path, job.mpp)

    def jpeg(self, job: SlideJob) -> JpegTileReader | None:
        """The reduced-size JPEG reader of ``job``'s slide, or None when OpenSlide reads it."""
        if job.reader == "openslide":
            return None
        if job.path not in self._jpeg:
            reader = JpegTileReader.from_slide(self.slide(job))  # type: ignore[arg-type]
            if reader is not None and not reader.fits(job.target_mpp, job.tile_px):
                reader.close()
                reader = None
            if reader is None and job.reader == "jpeg":
                raise HistoclusterError(
                    f"{job.path}: --reader jpeg needs a JPEG-tiled TIFF whose tiles are 1/2, 1/4 or "
                    "1/8 of a stored level at this --mpp — use --reader auto or openslide"
                )
            while len(self._jpeg) >= _OPEN_SLIDES_PER_WORKER:
                old = self._jpeg.pop(next(iter(self._jpeg)))
                if old is not None:
                    old.close()
            self._jpeg[job.path] = reader
        return self._jpeg[job.path]

    def read_tile(self, job: SlideJob, xy: tuple[int, int]) -> np.ndarray:
        """(tile_px, tile_px, 3) uint8 of the tile at level-0 ``xy``."""
        reader = self.jpeg(job)
        if reader is not None:
            return reader.read_tile(xy, job.target_mpp, job.tile_px)
        return self.slide(job).read_tile_at_mpp(xy, job.target_mpp, job.tile_px)

    def forget(self, path: str) -> None:
        """Close ``path`` everywhere (after a read error, which OpenSlide latches on its handle)."""
        self.slides.forget(path)
        reader = self._jpeg.pop(path, None)
        if reader is not None:
            reader.close()

    def close(self) -> None:
        """Close every open slide and JPEG reader."""
        for path in list(self._jpeg):
            self.forget(path)
        self.slides.close()

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.slides.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])  # type: ignore[misc]


class BatchPlan(Protocol):
    """Batches to read: batch i holds tiles ``rows/cols[start[i]:stop[i]]`` of ``jobs[slide[i]]``."""

    jobs: list[SlideJob]
    rows: np.ndarray
    cols: np.ndarray
    slide: np.ndarray
    start: np.ndarray
    stop: np.ndarray

    def __len__(self) -> int: ...


def _tile_error(row: int, col: int, e: BaseException) -> str:
    what = one_line(e) if isinstance(e, HistoclusterError) else f"{type(e).__name__}: {one_line(e)}"
    return f"tile (row {row}, col {col}): {what}"


def read_batch(
    slides: TileSources, job: SlideJob, rows: np.ndarray, cols: np.ndarray, out: np.ndarray
) -> tuple[np.ndarray, str]:
    """Read tiles ``rows``, ``cols`` (B,) of ``job`` into ``out`` (B, tile_px, tile_px, 3) uint8.

    Returns (failed (B,) bool, the first unreadable tile's one-line error or ""); unreadable
    tiles are left white. Raises ``HistoclusterError`` when the slide cannot be opened at all.
    """
    failed = np.zeros(len(rows), dtype=bool)

    def read(k: int) -> None:
        slides.slide(job)  # a slide that cannot be opened fails as a whole
        slides.jpeg(job)  # so does --reader jpeg on a slide it cannot serve
        r, c = int(rows[k]), int(cols[k])
        try:
            out[k] = slides.read_tile(job, (int(job.xs[c]), int(job.ys[r])))
        except Exception as e:  # a codec error deep in a reader
            raise _Unreadable(_tile_error(r, c, e)) from e

    k = 0
    try:
        for k in range(len(rows)):
            read(k)
        return failed, ""
    except _Unreadable:
        pass
    first = ""  # tiles before k were read; from k on, tile by tile on a fresh handle each time
    for j in range(k, len(rows)):
        slides.forget(job.path)  # the failed read may have latched on the handle
        try:
            read(j)
        except _Unreadable as e:
            failed[j] = True
            out[j] = _WHITE
            first = first or str(e)
    slides.forget(job.path)
    return failed, first


class _Unreadable(Exception):
    """One tile could not be read (the message is the one-line error)."""


class TileBatches(Dataset):
    """Batch i of a plan -> {"index", "tiles" (B,H,W,3) uint8, "failed" (B,) bool, "tile_error",
    "error", "fatal"}.

    ``error`` (the slide cannot be opened) fails the slide; ``tile_error`` names the first of the
    ``failed`` tiles; ``fatal`` (the batch cannot be handed to the main process) ends the run.
    In a worker process the tiles are read straight into shared memory, so a shortage of it is
    reported here rather than lost in the queue's feeder thread (which would hang the run).
    """

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan
        self.slides = TileSources(_OPEN_SLIDES_PER_WORKER)  # empty in each worker (picklable)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.plan
        job = p.jobs[int(p.slide[i])]
        rows = p.rows[p.start[i] : p.stop[i]]
        cols = p.cols[p.start[i] : p.stop[i]]
        item: dict[str, Any] = {"index": i, "tile_error": "", "error": "", "fatal": ""}
        empty = {
            "tiles": torch.empty(0, dtype=torch.uint8),
            "failed": torch.empty(0, dtype=torch.bool),
        }
        tiles = torch.empty((len(rows), job.tile_px, job.tile_px, 3), dtype=torch.uint8)
        if get_worker_info() is not None:
            try:
                tiles.share_memory_()
            except Exception as e:
                item["fatal"] = (
                    f"a tile-reading worker could not hand over a batch of {len(rows)} tiles "
                    f"({type(e).__name__}: {one_line(e)}) — free shared memory (/dev/shm) or raise "
                    "the file-size limit (ulimit -f), or use a smaller --batch-size or --workers 0; "
                    "then rerun the same command to resume"
                )
                return {**item, **empty}
        try:
            failed, item["tile_error"] = read_batch(self.slides, job, rows, cols, tiles.numpy())
        except HistoclusterError as e:
            return {**item, **empty, "error": str(e)}
        except Exception as e:
            msg = f"{job.path}: cannot be opened ({type(e).__name__}: {one_line(e)}) — the file may be corrupt; re-copy it"
            return {**item, **empty, "error": msg}
        return {**item, "tiles": tiles, "failed": torch.from_numpy(failed)}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    default_heap()  # forked inside extraction's retained heap: a reader keeps glibc's defaults


_DATALOADER_FAILURES = ("exited unexpectedly", "killed by signal", "timed out after")


def read_batches(
    dataset: TileBatches,
    workers: int,
    *,
    pin_memory: bool = False,
    timeout_s: float = 300.0,
) -> Iterator[dict[str, Any]]:
    """The items of ``dataset`` in order, read by ``workers`` processes (0: in this process).

    A worker that dies, sends nothing for ``timeout_s`` seconds, or cannot hand over a batch
    raises one ``HistoclusterError``; the slides this process opened are closed at the end.
    """
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
        timeout=timeout_s if workers > 0 else 0,
    )
    it = iter(loader)
    try:
        while True:
            try:
                item = next(it)
            except StopIteration:
                return
            except RuntimeError as e:
                text = str(e)
                if not any(s in text for s in _DATALOADER_FAILURES):
                    raise
                raise HistoclusterError(
                    f"a tile-reading worker failed ({one_line(e)}) — what was encoded is kept; "
                    "rerun the same command to resume (with --workers 0 or a smaller --batch-size "
                    "if memory is short)"
                ) from None
            if item["fatal"]:
                raise HistoclusterError(item["fatal"])
            yield item
    finally:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        dataset.slides.close()
