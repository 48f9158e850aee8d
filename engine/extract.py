"""python -m engine.extract: encode the tissue tiles of slides into a zarr feature store.

    python -m engine.extract SLIDE_OR_DIR... --out features.zarr --encoder SPEC [options]
    torchrun --nproc-per-node N -m engine.extract ...      # several processes / GPUs

How it works:

- Each slide gets a :class:`~engine.tiling.TileGrid` (tissue fractions at thumbnail scale) and a
  group in the :class:`~engine.store.FeatureStore`. Work is planned per 32 x 32-tile zarr chunk:
  the selected tiles of a chunk, in row-major order, are cut into batches of ``--batch-size``
  (a batch never spans chunks, and a given tile always lands in the same batch, so a resumed or
  multi-process run computes bit-identical features).
- Start-up: the encoder loads in a thread while the first slides' tissue masks are computed
  (both release the GIL for most of their work); nothing on the way imports torchvision.
- DataLoader worker processes open each slide once and read + decode tiles; the main process
  normalises them and runs the encoder (:class:`~engine.encode.TileEncoder`: channels_last;
  bf16 autocast on CPUs with native bf16 and fp16/bf16 on CUDA when ``--precision auto``;
  pinned memory and non-blocking copies on CUDA).
- A chunk's features are written as one whole zarr chunk, then its ``done`` flags, when the chunk
  is finished (and every few seconds while a slow chunk is in progress), so a run killed at any
  moment resumes where it stopped, and only whole chunks are ever written.
- Under torchrun, ranks split the pending chunks (not whole slides): rank 0 creates the store,
  ranks prepare slides round-robin, then each rank encodes and writes its own chunks.
- An unreadable slide is reported and skipped; the others finish; the exit status is then 1.
  A batch that fails to read is read again tile by tile (:mod:`engine.tile_reader`): readable
  tiles are encoded, unreadable ones recorded in the store's ``failed`` array, named in the
  summary (exit status 1) and read again only with ``--retry-failed``. A reader worker that
  dies or cannot hand over its batch ends the run with one line; what was encoded is kept.
- One extraction at a time per store: ``<out>.lock`` names the process writing it.
  A JSON summary (tiles, seconds, tiles/s, failures) and the resolved configuration are written
  next to the store as ``<out>.summary.json`` and ``<out>.config.json``.

Progress stages: ``"tissue"`` (slides prepared of this rank's slides) and ``"encode"`` (tiles
encoded of this rank's tiles); a ``Cancelled`` raised by the callback stops the run after what was
encoded is written.
"""

from __future__ import annotations

import csv
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine import cli
from engine.cli import option
from engine.device_tiles import DeviceTileDecoder, SourceBatches, item_tiles
from engine.distributed import DistInfo, barrier, init_distributed
from engine.encode import PRECISIONS, TileEncoder
from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError, one_line
from engine.files import atomic_write_json
from engine.models import default_encoder_spec, load_encoder
from engine.progress import Progress, no_progress
from engine.slide import SLIDE_SUFFIXES, find_slides, open_slide, slide_id
from engine.store import Block, FeatureStore, SlideFeatures
from engine.store_lock import StoreLock
from engine.tile_reader import READERS, SlideJob, TileBatches, read_batches
from engine.tiling import TileGrid, Tiling
from engine.tissue import TISSUE_METHODS

__all__ = [
    "DEVICES",
    "ExtractConfig",
    "ExtractSummary",
    "auto_workers",
    "chunk_batches",
    "expand_inputs",
    "main",
    "make_plan",
    "parse_slide_mpp",
    "run",
]

DEVICES = ("auto", "cpu", "cuda")


def auto_workers(local_world_size: int = 1) -> int:
    """Reader processes per rank: this rank's share of the CPUs minus one for the main process, 1..8."""
    return max(1, min(8, (os.cpu_count() or 2) // max(1, local_world_size) - 1))


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``python -m engine.extract`` needs; written as JSON next to the store."""

    slides: tuple[str, ...] = option(
        positional=True,
        metavar="SLIDE_OR_DIR",
        help="slide files, or directories whose slide files to encode",
    )
    out: str = option(help="the feature store to write (features.zarr); an existing one is resumed")
    encoder: str = option(
        default_factory=default_encoder_spec,
        help="checkpoint path or named encoder, e.g. resnet18-random, ciga-resnet18",
    )
    tile_px: int = option(224, help="tile side in pixels at --mpp")
    mpp: float = option(0.5, help="micrometres per pixel of the tiles")
    stride_px: int | None = option(
        None, help="step between tiles in pixels at --mpp (default: --tile-px)"
    )
    min_tissue: float = option(0.5, help="encode tiles with at least this tissue fraction")
    tissue: str = option("otsu", choices=TISSUE_METHODS, help="tissue detection method")
    batch_size: int = option(64, help="tiles per encoder batch")
    workers: int | None = option(
        None,
        help="tile-reading worker processes per rank; 0 reads in the main process "
        f"(default: the rank's share of the CPUs minus one, 1 to 8; here {auto_workers()})",
    )
    device: str = option(
        "auto", help="auto, cpu or cuda (default: %(default)s; auto = cuda when available)"
    )
    precision: str = option(
        "auto",
        choices=PRECISIONS,
        help="encoder precision; auto = bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32",
    )
    reader: str = option(
        "auto",
        choices=READERS,
        help="how tiles are read: jpeg decodes a JPEG-tiled TIFF's (SVS, pyramidal TIFF) own tiles at "
        "1/2, 1/4 or 1/8 scale when the tiles are that much smaller than a stored level; openslide "
        "always reads through OpenSlide and resizes; device: workers read the JPEG tiles' bytes and "
        "the encoder's device (CUDA) decodes, crops and resizes them (other slides as auto); "
        "auto = jpeg where it fits, else openslide. "
        "Features are bit-identical across resume and torchrun for a given reader",
    )
    slide_mpp: str | None = option(
        None,
        metavar="VALUE_OR_CSV",
        help="micrometres per pixel of slides whose files lack it (overrides the metadata): "
        "one number for all, or a CSV of slide,mpp rows",
    )
    overwrite: bool = option(
        False, help="replace an existing store made with another encoder or tiling"
    )
    retry_failed: bool = option(
        False, help="read again the tiles an earlier run recorded as unreadable"
    )
    quiet: bool = option(False, help="no progress bar or summary line")
    trust_checkpoint: bool = option(
        False,
        help="allow loading a checkpoint that needs pickle (only from a source you trust)",
    )
    flush_every_s: float = option(
        10.0, cli=False, help="seconds between writes of a chunk still in progress"
    )
    channels_last: bool = option(True, cli=False, help="run the encoder in channels_last layout")
    reader_timeout_s: float = option(
        300.0, cli=False, help="seconds without a batch from the reader workers before giving up"
    )

    def __post_init__(self) -> None:
        if isinstance(self.slides, str | Path):
            object.__setattr__(self, "slides", (str(self.slides),))
        else:
            object.__setattr__(self, "slides", tuple(str(s) for s in self.slides))

    @property
    def tiling(self) -> Tiling:
        """The tiling these flags ask for."""
        return Tiling(self.tile_px, self.mpp, self.stride_px, self.tissue, self.min_tissue)  # type: ignore[arg-type]

    def summary_path(self) -> Path:
        """``<out>.summary.json``: what the last run did."""
        out = Path(self.out)
        return out.with_name(out.name + ".summary.json")

    def resolved_config_path(self) -> Path:
        """``<out>.config.json``: this configuration with its resolved values (written by ``run``)."""
        out = Path(self.out)
        return out.with_name(out.name + ".config.json")


@dataclass
class ExtractSummary:
    """What a run did; ``tiles`` counts tiles encoded by this run (all ranks)."""

    tiles: int = 0
    seconds: float = 0.0
    tiles_per_s: float = 0.0
    encode_seconds: float = 0.0
    encode_tiles_per_s: float = 0.0
    slides: int = 0
    tiles_already_done: int = 0
    tiles_unreadable: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Slides that failed (``slide``, ``error``), and slides with unreadable tiles (with
    ``tiles_unreadable`` and ``tiles_encoded`` too); any of them makes the exit status 1."""
    precision: str = "fp32"
    device: str = "cpu"
    world_size: int = 1
    warnings: list[str] = field(default_factory=list)
    """Said once, not failures (e.g. a slide level whose device decode fell back to the CPU)."""


# ----------------------------------------------------------------------------- inputs


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the slide files directly inside each directory (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found = find_slides(p)
            if not found:
                raise HistoclusterError(
                    f"{p}: no slide files in this directory ({', '.join(sorted(SLIDE_SUFFIXES))}) — "
                    "give slide files or a directory that holds them"
                )
            out.extend(found)
        else:
            out.append(p)
    seen: dict[str, Path] = {}
    for p in out:
        sid = slide_id(p)
        if sid in seen and seen[sid].resolve() != p.resolve():
            raise HistoclusterError(
                f"{p}: has the same slide id {sid!r} as {seen[sid]} — rename one of them or "
                "extract them into different stores"
            )
        seen[sid] = p
    return list({slide_id(p): p for p in out}.values())


def parse_slide_mpp(value: str | None) -> dict[str, float] | float | None:
    """``--slide-mpp``: one number for every slide, or a CSV of ``slide,mpp`` rows.

    A CSV row's slide may be a path, a file name or a slide id; a header row is allowed.
    """
    if value is None:
        return None
    try:
        mpp = float(value)
    except ValueError:
        pass
    else:
        if not (math.isfinite(mpp) and mpp > 0):
            raise HistoclusterError(
                f"--slide-mpp {value}: must be a positive number of micrometres per pixel"
            )
        return mpp
    path = Path(value)
    if not path.is_file():
        raise HistoclusterError(
            f"{value}: --slide-mpp is neither a number nor an existing CSV file — give e.g. "
            "--slide-mpp 0.25 or a CSV of slide,mpp rows"
        )
    try:
        return _read_slide_mpp_csv(path)
    except UnicodeDecodeError:
        raise HistoclusterError(
            f"{path}: --slide-mpp is not a text CSV (binary content) — give a CSV of slide,mpp rows"
        ) from None


def _read_slide_mpp_csv(path: Path) -> dict[str, float]:
    table: dict[str, float] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise HistoclusterError(
                    f"{path}: line {n} has {len(row)} field(s) — each row must be slide,mpp"
                )
            try:
                mpp = float(row[1])
            except ValueError:
                if not table and n == 1:
                    continue  # header
                raise HistoclusterError(
                    f"{path}: line {n}: {row[1]!r} is not a number — each row must be slide,mpp"
                ) from None
            if not (math.isfinite(mpp) and mpp > 0):
                raise HistoclusterError(f"{path}: line {n}: mpp {mpp} must be positive")
            table[slide_id(row[0].strip())] = mpp
    if not table:
        raise HistoclusterError(f"{path}: no slide,mpp rows — give one row per slide")
    return table


def _mpp_for(path: Path, slide_mpp: dict[str, float] | float | None) -> float | None:
    if isinstance(slide_mpp, dict):
        return slide_mpp.get(slide_id(path))
    return slide_mpp


# ----------------------------------------------------------------------------- the plan


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


# ----------------------------------------------------------------------------- writing


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


# ----------------------------------------------------------------------------- the run


def _gather(obj: Any, info: DistInfo) -> list[Any]:
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _tile_slide(path: Path, tiling: Tiling, slide_mpp: Any) -> TileGrid | str:
    """``path``'s tile grid with its tissue fractions computed, or the one-line error when the
    slide cannot be read (the slide fails, the run goes on)."""
    try:
        with open_slide(path, mpp=_mpp_for(path, slide_mpp)) as slide:
            grid = TileGrid.from_tiling(slide, tiling)
            grid.tissue  # noqa: B018 - read the slide here, so a read error is the slide's
    except HistoclusterError as e:
        return str(e)
    except OSError as e:
        return cli.describe_os_error(e)
    except Exception as e:  # a codec error deep in a reader
        return f"{path}: failed to read ({type(e).__name__}: {one_line(e)}) — the file may be corrupt; re-copy it"
    return grid


def _prepare_slide(store: FeatureStore, path: Path, grid: TileGrid | str) -> str | None:
    """Create (or reuse) the store group of ``path`` tiled as ``grid`` (from :func:`_tile_slide`).

    Returns ``grid`` when it is an error; an ``OSError`` writing the store is raised (the whole
    run stops).
    """
    if isinstance(grid, str):
        return grid
    store.add_slide(slide_id(path), grid).discard_damaged_blocks()  # re-encoded below
    return None


def _open_store(
    out: Path, encoder: EncoderId, tiling: Tiling, overwrite: bool, info: DistInfo
) -> StoreLock | None:
    """Rank 0 locks the store and creates (or checks) it; the others learn whether it said yes.

    Returns the lock rank 0 holds (None on the other ranks); release it when the run ends.
    """

    def lock_and_open() -> StoreLock:
        lock = StoreLock(out).acquire()
        try:
            FeatureStore.create_or_open(out, encoder, tiling, overwrite=overwrite)
        except BaseException:
            lock.release()
            raise
        return lock

    if not info.distributed:
        return lock_and_open()
    error, lock = None, None
    if info.is_main:
        try:
            lock = lock_and_open()
        except HistoclusterError as e:
            error = str(e)
        except OSError as e:
            error = cli.describe_os_error(e)
    error = _broadcast(error, info)
    if error:
        raise HistoclusterError(error)
    return lock


def run(
    cfg: ExtractConfig, *, progress: Progress = no_progress, info: DistInfo | None = None
) -> ExtractSummary:
    """Extract features as ``cfg`` says.

    Per-slide problems end up in ``summary.failures``; problems with the whole run raise
    ``HistoclusterError`` (bad flags, encoder, store) or ``OSError`` (a full disk, a file-size
    limit, a read-only store: what was written stays resumable). ``progress("tissue", slides,
    total)`` after each slide prepared, then ``progress("encode", tiles, total)`` after every batch
    (this rank's counts); a ``Cancelled`` it raises stops the run after what was encoded is written.
    """
    t0 = time.perf_counter()
    _validate(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise HistoclusterError(
            f"--device {cfg.device}: no CUDA device is available — use --device cpu or auto"
        )
    info = info or init_distributed(cfg.device)
    device = info.device
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", info.world_size))
    if info.distributed and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    workers = auto_workers(local_world) if cfg.workers is None else cfg.workers
    paths = expand_inputs(cfg.slides)
    slide_mpp = parse_slide_mpp(cfg.slide_mpp)
    out = Path(cfg.out)
    tiling = cfg.tiling
    mine = [p for i, p in enumerate(paths) if i % info.world_size == info.rank]
    progress("tissue", 0, len(mine))
    # The encoder loads in a thread while this one computes the first tissue masks (both
    # release the GIL for most of their work: start-up keeps two cores busy instead of one).
    loading = _Background(lambda: _load_tile_encoder(cfg, device))
    early: dict[Path, TileGrid | str] = {}
    for path in mine[:_EARLY_SLIDES]:
        if loading.done():
            break
        early[path] = _tile_slide(path, tiling, slide_mpp)
    tile_encoder = loading.result()
    encoder = tile_encoder.encoder
    with _naming_os_errors(out), ExitStack() as held:
        lock = _open_store(out, encoder.identity(), tiling, cfg.overwrite, info)
        if lock is not None:
            held.callback(lock.release)
        store = FeatureStore.open(out, mode="r+")
        if info.is_main:
            cli.write_config(
                cfg.resolved_config_path(),
                cfg,
                encoder=encoder.info(),
                tiling=tiling.to_attrs(),
                precision=tile_encoder.precision,
                device=str(device),
                world_size=info.world_size,
                workers=workers,
            )

        failures = _prepare_slides(store, mine, early, tiling, slide_mpp, info, progress)
        ready = [slide_id(p) for p in paths if str(p) not in failures]
        plan = make_plan(
            store, ready, cfg.batch_size, info.rank, info.world_size, cfg.retry_failed, cfg.reader
        )
        path_of = {slide_id(p): str(p) for p in paths}

        t_enc = time.perf_counter()
        encoded = _encode(plan, store, tile_encoder, workers, cfg, progress)
        encode_s = time.perf_counter() - t_enc

        # gather and summarise
        for sid, msg in encoded.slide_errors.items():
            failures[path_of[sid]] = msg
        parts = _gather(
            (encoded.tiles, encode_s, failures, encoded.tile_errors, encoded.notes), info
        )
        barrier()
        all_failures: dict[str, str] = {}
        tile_errors: dict[str, str] = {}
        for _, _, f, t, _ in parts:
            all_failures.update(f)
            for sid, msg in t.items():
                tile_errors.setdefault(sid, msg)
        unreadable = _unreadable_tiles(store, ready, path_of, all_failures, tile_errors)
        tiles = sum(p[0] for p in parts)
        encode_s = max(p[1] for p in parts)
        seconds = time.perf_counter() - t0
        summary = ExtractSummary(
            tiles=tiles,
            seconds=round(seconds, 3),
            tiles_per_s=round(tiles / seconds, 3) if seconds > 0 else 0.0,
            encode_seconds=round(encode_s, 3),
            encode_tiles_per_s=round(tiles / encode_s, 3) if encode_s > 0 else 0.0,
            slides=len(paths) - len(all_failures),
            tiles_already_done=plan.already_done,  # counted over all slides on every rank
            tiles_unreadable=sum(int(u["tiles_unreadable"]) for u in unreadable),
            failures=[{"slide": s, "error": m} for s, m in sorted(all_failures.items())]
            + unreadable,
            precision=tile_encoder.precision,
            device=str(device),
            world_size=info.world_size,
            warnings=sorted({note for p in parts for note in p[4]}),
        )
        if info.is_main:
            atomic_write_json(cfg.summary_path(), asdict(summary))
    return summary


def _load_tile_encoder(cfg: ExtractConfig, device: torch.device) -> TileEncoder:
    """``cfg.encoder`` on ``device`` at ``cfg.precision`` (run in a thread: CUDA's current
    device is per thread, so it is set here too)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    encoder = load_encoder(cfg.encoder, trust_checkpoint=cfg.trust_checkpoint)
    return TileEncoder(encoder, device, cfg.precision, cfg.channels_last)


_EARLY_SLIDES = 2
"""Slides tiled while the encoder loads (their grids wait in memory until the store is open)."""


class _Background:
    """``fn()`` run in a daemon thread (a Ctrl-C never waits for it): ``done()``, ``result()``."""

    def __init__(self, fn: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Any) -> None:
        try:
            self._value = fn()
        except BaseException as e:  # re-raised in the caller's thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        """``fn``'s return value, once it is ready; its exception is raised here."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _unreadable_tiles(
    store: FeatureStore,
    slide_ids: Sequence[str],
    path_of: dict[str, str],
    slide_failures: dict[str, str],
    tile_errors: dict[str, str],
) -> list[dict[str, Any]]:
    """One failure entry per slide with tiles recorded as unreadable (this run or an earlier one)."""
    out = []
    for sid in slide_ids:
        path = path_of[sid]
        if path in slide_failures:
            continue
        sf = store.slide(sid)
        n = sf.n_failed()
        if n == 0:
            continue
        first = tile_errors.get(sid, "recorded by an earlier run")
        out.append(
            {
                "slide": path,
                "error": f"{path}: {n} of {int(sf.selected.sum())} tissue tiles unreadable, "
                f"{sf.n_encoded()} encoded (first: {first}) — they are recorded as failed in the "
                "store; re-copy the file, then rerun with --retry-failed",
                "tiles_unreadable": n,
                "tiles_encoded": sf.n_encoded(),
            }
        )
    return out


@contextmanager
def _naming_os_errors(path: Path) -> Iterator[None]:
    """An ``OSError`` without a file name (zarr's chunk writes) gets ``path`` (the store) as its file."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or one_line(e), str(path)) from e
        raise


def _prepare_slides(
    store: FeatureStore,
    mine: list[Path],
    early: dict[Path, TileGrid | str],
    tiling: Tiling,
    slide_mpp: dict[str, float] | float | None,
    info: DistInfo,
    progress: Progress,
) -> dict[str, str]:
    """Tile this rank's slides (``early``: those tiled already) and add them to the store (the
    ranks take the slides round-robin: tissue masks are the slow part); returns {path: error}
    of the slides that could not be opened, from every rank."""
    failures: dict[str, str] = {}
    for n, path in enumerate(mine, start=1):
        grid = early.pop(path) if path in early else _tile_slide(path, tiling, slide_mpp)
        error = _prepare_slide(store, path, grid)
        if error is not None:
            failures[str(path)] = error
        progress("tissue", n, len(mine))
    for part in _gather(failures, info):
        failures.update(part)
    barrier()
    return failures


@dataclass
class _Encoded:
    """What this rank's encoding did: tiles encoded, slides that failed, unreadable tiles."""

    tiles: int = 0
    slide_errors: dict[str, str] = field(default_factory=dict)  # {slide id: error}
    tile_errors: dict[str, str] = field(default_factory=dict)  # {slide id: first tile error}
    notes: list[str] = field(default_factory=list)  # the device decoder's fallbacks


def _encode(
    plan: Plan,
    store: FeatureStore,
    tile_encoder: TileEncoder,
    workers: int,
    cfg: ExtractConfig,
    progress: Progress,
) -> _Encoded:
    """Read, encode and write every batch of ``plan``."""
    device = tile_encoder.device
    writer = ChunkWriter(store, cfg.flush_every_s)
    result = _Encoded()
    failed = result.slide_errors
    seen = 0  # tiles encoded or found unreadable
    decoder = DeviceTileDecoder(device) if cfg.reader == "device" else None
    batches = read_batches(
        TileBatches(plan) if decoder is None else SourceBatches(plan),  # type: ignore[arg-type]
        workers,
        pin_memory=device.type == "cuda",
        timeout_s=cfg.reader_timeout_s,
    )
    pending: tuple[int, torch.Tensor, torch.Tensor, Any] | None = None

    def finish(i: int, feats: torch.Tensor, unreadable: torch.Tensor, event: Any) -> None:
        nonlocal seen
        if event is not None:
            event.synchronize()
        sid = plan.jobs[int(plan.slide[i])].slide_id
        if sid in failed:
            return
        rows = plan.rows[plan.start[i] : plan.stop[i]]
        cols = plan.cols[plan.start[i] : plan.stop[i]]
        bad = unreadable.numpy()
        values = feats.numpy()
        if not np.isfinite(values[~bad]).all():  # never write NaN / inf into a store
            raise HistoclusterError(
                f"{cfg.encoder}: gives non-finite features (NaN or inf) on {plan.jobs[int(plan.slide[i])].path} "
                "— the checkpoint is damaged or its training diverged; use another encoder "
                "(nothing of this batch was written)"
            )
        writer.add(sid, tuple(plan.chunk[i]), rows, cols, values, bool(plan.last[i]), bad)
        result.tiles += int((~bad).sum())
        seen += len(rows)
        progress("encode", seen, plan.n_tiles)

    progress("encode", 0, plan.n_tiles)
    try:
        with torch.inference_mode():  # the CUDA host copies too
            for item in batches:
                i = int(item["index"])
                sid = plan.jobs[int(plan.slide[i])].slide_id
                if sid in failed:
                    continue
                if item["error"]:
                    if pending is not None:
                        finish(*pending)
                        pending = None
                    failed[sid] = item["error"]
                    writer.flush(sid)  # what was encoded is valid
                    continue
                if decoder is not None:  # the bytes decoded on the device
                    item = item_tiles(item, decoder)
                if item["tile_error"]:
                    result.tile_errors.setdefault(sid, item["tile_error"])
                feats = tile_encoder(item["tiles"])  # unreadable tiles are white: same batch shape
                if device.type == "cuda":
                    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
                    host.copy_(feats, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    if pending is not None:
                        finish(*pending)
                    pending = (i, host, item["failed"], event)
                else:
                    finish(i, feats, item["failed"], None)
            if pending is not None:
                finish(*pending)
    finally:
        writer.flush()
        batches.close()
    result.notes = decoder.notes if decoder is not None else []
    return result


def _validate(cfg: ExtractConfig) -> None:
    checks = [
        (cfg.tile_px > 0, f"--tile-px {cfg.tile_px}: must be a positive number of pixels"),
        (
            cfg.mpp > 0 and math.isfinite(cfg.mpp),
            f"--mpp {cfg.mpp}: must be positive micrometres per pixel",
        ),
        (
            cfg.stride_px is None or cfg.stride_px > 0,
            f"--stride-px {cfg.stride_px}: must be positive",
        ),
        (0.0 <= cfg.min_tissue <= 1.0, f"--min-tissue {cfg.min_tissue}: must lie in [0, 1]"),
        (
            cfg.tissue in TISSUE_METHODS,
            f"--tissue {cfg.tissue}: choose one of {', '.join(TISSUE_METHODS)}",
        ),
        (cfg.batch_size > 0, f"--batch-size {cfg.batch_size}: must be positive"),
        (cfg.workers is None or cfg.workers >= 0, f"--workers {cfg.workers}: must be 0 or more"),
        (
            cfg.device in DEVICES or cfg.device.startswith("cuda:"),
            f"--device {cfg.device}: choose one of {', '.join(DEVICES)}",
        ),
        (
            cfg.precision in PRECISIONS,
            f"--precision {cfg.precision}: choose one of {', '.join(PRECISIONS)}",
        ),
        (bool(cfg.slides), "no slides given — pass slide files or directories"),
    ]
    for ok, message in checks:
        if not ok:
            raise HistoclusterError(message)


# ----------------------------------------------------------------------------- command line

_PROG = "python -m engine.extract"
_DESCRIPTION = (
    "Encode the tissue tiles of whole-slide images into a zarr feature store "
    "(resumable; run under torchrun to split the tiles over processes / GPUs)."
)


def report(cfg: ExtractConfig, summary: ExtractSummary) -> str:
    """The one summary line printed after a run."""
    whole = [f for f in summary.failures if "tiles_unreadable" not in f]
    partial = [f for f in summary.failures if "tiles_unreadable" in f]
    failed = (
        f"; {len(whole)} failed: " + ", ".join(Path(f["slide"]).name for f in whole)
        if whole
        else ""
    )
    if partial:
        failed += f"; {summary.tiles_unreadable} tiles unreadable in " + ", ".join(
            f"{Path(f['slide']).name} ({f['tiles_unreadable']})" for f in partial
        )
    return (
        f"extracted {summary.tiles} tiles ({summary.tiles_already_done} already done) from "
        f"{summary.slides} slide(s) in {summary.seconds:.1f} s ({summary.tiles_per_s:.1f} tiles/s, "
        f"{summary.precision} on {summary.device}){failed} -> {cfg.out}"
    )


def build_parser() -> Any:
    """The command's ``argparse`` parser (generated from :class:`ExtractConfig`)."""
    return cli.build_parser(ExtractConfig, prog=_PROG, description=_DESCRIPTION)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some slides failed, 2 bad input, 130 interrupted)."""
    return cli.main(ExtractConfig, run, argv, prog=_PROG, description=_DESCRIPTION, report=report)


if __name__ == "__main__":
    sys.exit(main())
