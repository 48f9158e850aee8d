"""python -m engine.extract: encode the tissue tiles of slides into a zarr feature store.

    python -m engine.extract SLIDE_OR_DIR... --out features.zarr --encoder SPEC [options]
    torchrun --nproc-per-node N -m engine.extract ...      # several processes / GPUs

How it works:

- Each slide gets a :class:`~engine.tiling.TileGrid` (tissue fractions at thumbnail scale) and a
  group in the :class:`~engine.store.FeatureStore`. Work is planned per 32 x 32-tile zarr chunk:
  the selected tiles of a chunk, in row-major order, are cut into batches of ``--batch-size``
  (a batch never spans chunks, and a given tile always lands in the same batch, so a resumed or
  multi-process run computes bit-identical features).
- DataLoader worker processes open each slide once and read + decode tiles; the main process
  normalises them and runs the encoder (channels_last; bf16 autocast on CPUs with native bf16
  and fp16/bf16 on CUDA when ``--precision auto``; pinned memory and non-blocking copies on CUDA).
- A chunk's features are written as one whole zarr chunk, then its ``done`` flags, when the chunk
  is finished (and every few seconds while a slow chunk is in progress), so a run killed at any
  moment resumes where it stopped, and only whole chunks are ever written.
- Under torchrun, ranks split the pending chunks (not whole slides): rank 0 creates the store,
  ranks prepare slides round-robin, then each rank encodes and writes its own chunks.
- An unreadable slide is reported and skipped; the others finish; the exit status is then 1.
  A JSON summary (tiles, seconds, tiles/s, failures) and the resolved configuration are written
  next to the store as ``<out>.summary.json`` and ``<out>.config.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm import tqdm

from engine.distributed import DistInfo, barrier, cleanup, init_distributed
from engine.encode import PRECISIONS, TileEncoder
from engine.errors import HistoclusterError, one_line
from engine.models import default_encoder_spec, load_encoder
from engine.slide import Slide, open_slide, slide_id
from engine.store import Block, FeatureStore, SlideFeatures
from engine.tiling import TileGrid, Tiling
from engine.tissue import TISSUE_METHODS

DEVICES = ("auto", "cpu", "cuda")
SLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif"}
    | {".png", ".jpg", ".jpeg"}
)
_OPEN_SLIDES_PER_WORKER = 4


@dataclass
class ExtractConfig:
    """Everything ``python -m engine.extract`` needs; written as JSON next to the store."""

    slides: list[str]
    out: str
    encoder: str = field(default_factory=default_encoder_spec)
    tile_px: int = 224
    mpp: float = 0.5
    stride_px: int | None = None
    min_tissue: float = 0.5
    tissue: str = "otsu"
    batch_size: int = 64
    workers: int | None = None  # None: auto_workers()
    device: str = "auto"
    precision: str = "auto"
    slide_mpp: str | None = None
    overwrite: bool = False
    quiet: bool = False
    trust_checkpoint: bool = False
    # not command-line flags: seconds between flushes of an unfinished chunk, memory layout
    flush_every_s: float = 10.0
    channels_last: bool = True


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
    failures: list[dict[str, str]] = field(default_factory=list)
    precision: str = "fp32"
    device: str = "cpu"
    world_size: int = 1


# ----------------------------------------------------------------------------- inputs


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the slide files directly inside each directory (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir() and p.suffix.lower() != ".mrxs":
            found = sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES
            )
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
    table: dict[str, float] = {}
    with open(path, newline="") as f:
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


# ----------------------------------------------------------------------------- encoding


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SlideJob:
    """What a reader needs to read one slide's tiles: file, mpp used and the grid's origins."""

    slide_id: str
    path: str
    mpp: tuple[float, float]
    target_mpp: float
    tile_px: int
    xs: np.ndarray  # (cols,) int64 level-0 x of each grid column
    ys: np.ndarray  # (rows,) int64 level-0 y of each grid row


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
) -> Plan:
    """Split the pending chunks of ``slide_ids`` over ranks (balanced by tiles, deterministic)
    and cut this rank's chunks into batches."""
    chunks: list[tuple[int, Block, list[np.ndarray]]] = []
    jobs: list[SlideJob] = []
    already_done = 0
    tiling = store.tiling
    for sid in slide_ids:
        sf = store.slide(sid)
        selected = sf.selected
        done = sf.done
        already_done += int((selected & done).sum())
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
            )
        )
        for block in sf.blocks():
            sl = (slice(block.r0, block.r1), slice(block.c0, block.c1))
            batches = chunk_batches(selected[sl], done[sl], batch_size)
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
    )


class TileBatches(Dataset):
    """Batch i of a :class:`Plan` -> {"index": i, "tiles": (B,H,W,3) uint8, "error": ""}.

    Read in DataLoader workers: each worker opens a slide the first time it needs it and keeps
    a few open. A read that fails gives an empty ``tiles`` and the one-line ``error``.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._open: OrderedDict[int, Slide] = OrderedDict()

    def __len__(self) -> int:
        return len(self.plan)

    def _slide(self, i: int) -> Slide:
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        job = self.plan.jobs[i]
        slide = open_slide(job.path, mpp=job.mpp)
        self._open[i] = slide
        while len(self._open) > _OPEN_SLIDES_PER_WORKER:
            self._open.popitem(last=False)[1].close()
        return slide

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.plan
        job = p.jobs[int(p.slide[i])]
        rows = p.rows[p.start[i] : p.stop[i]]
        cols = p.cols[p.start[i] : p.stop[i]]
        tiles = np.empty((len(rows), job.tile_px, job.tile_px, 3), dtype=np.uint8)
        try:
            slide = self._slide(int(p.slide[i]))
            for k, (r, c) in enumerate(zip(rows, cols, strict=True)):
                tiles[k] = slide.read_tile_at_mpp(
                    (int(job.xs[c]), int(job.ys[r])), job.target_mpp, job.tile_px
                )
        except HistoclusterError as e:
            return {"index": i, "tiles": torch.empty(0, dtype=torch.uint8), "error": str(e)}
        except Exception as e:  # a codec error deep in a reader: report the slide, keep going
            msg = f"{job.path}: failed to read tiles ({type(e).__name__}: {one_line(e)}) — the file may be corrupt; re-copy it"
            return {"index": i, "tiles": torch.empty(0, dtype=torch.uint8), "error": msg}
        return {"index": i, "tiles": torch.from_numpy(tiles), "error": ""}


def auto_workers(local_world_size: int = 1) -> int:
    """Reader processes per rank: this rank's share of the CPUs minus one for the main process, 1..8."""
    return max(1, min(8, (os.cpu_count() or 2) // max(1, local_world_size) - 1))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    info = get_worker_info()
    if info is not None:
        info.dataset._open = OrderedDict()  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- writing


class ChunkWriter:
    """Collects a chunk's features and writes it whole: features first, then done flags.

    A chunk is written when its last batch arrives, and also every ``flush_every_s`` seconds
    while it is in progress (so a slow chunk loses little when killed).
    """

    def __init__(self, store: FeatureStore, flush_every_s: float) -> None:
        self.store = store
        self.flush_every_s = flush_every_s
        self._open: dict[
            tuple[str, int, int], tuple[SlideFeatures, Block, np.ndarray, np.ndarray, float]
        ] = {}

    def add(
        self,
        slide_id: str,
        chunk: tuple[int, int],
        rows: np.ndarray,
        cols: np.ndarray,
        feats: np.ndarray,
        last: bool,
    ) -> None:
        """Place ``feats`` (B, dim) of tiles ``rows``, ``cols`` (B,) into their chunk's buffer."""
        key = (slide_id, int(chunk[0]), int(chunk[1]))
        if key not in self._open:
            sf = self.store.slide(slide_id)
            block = sf.block_at(*chunk)
            f, d = sf.read_block(block)
            self._open[key] = (sf, block, f.copy(), d.copy(), time.monotonic())
        sf, block, f, d, since = self._open[key]
        f[rows - block.r0, cols - block.c0] = feats.astype(np.float16)
        d[rows - block.r0, cols - block.c0] = True
        if last:
            sf.write_block(block, f, d)
            del self._open[key]
        elif time.monotonic() - since >= self.flush_every_s:
            sf.write_block(block, f, d)
            self._open[key] = (sf, block, f, d, time.monotonic())

    def flush(self, slide_id: str | None = None) -> None:
        """Write every open chunk (of one slide, or all)."""
        for key in [k for k in self._open if slide_id is None or k[0] == slide_id]:
            sf, block, f, d, _ = self._open.pop(key)
            sf.write_block(block, f, d)


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


def _prepare_slide(store: FeatureStore, path: Path, cfg: ExtractConfig, slide_mpp: Any) -> None:
    """Open ``path``, tile it and create (or reuse) its group in the store."""
    with open_slide(path, mpp=_mpp_for(path, slide_mpp)) as slide:
        grid = TileGrid(slide, cfg.mpp, cfg.tile_px, cfg.stride_px, cfg.min_tissue, cfg.tissue)  # type: ignore[arg-type]
        store.add_slide(slide_id(path), grid)


def run(
    cfg: ExtractConfig,
    info: DistInfo | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExtractSummary:
    """Extract features as ``cfg`` says. Per-slide problems end up in ``summary.failures``;
    problems with the whole run (bad flags, encoder, store) raise ``HistoclusterError``.

    ``progress(done, total)`` is called with this rank's tile counts after every batch; an
    exception it raises stops the run after what was encoded is written (a GUI's cancel).
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
    encoder = load_encoder(cfg.encoder, trust_checkpoint=cfg.trust_checkpoint)
    tile_encoder = TileEncoder(encoder, device, cfg.precision, cfg.channels_last)
    tiling = Tiling(cfg.tile_px, cfg.mpp, cfg.stride_px, cfg.tissue, cfg.min_tissue)  # type: ignore[arg-type]
    out = Path(cfg.out)

    # rank 0 creates (or checks) the store; the others open it after it said yes
    error = None
    if info.is_main:
        try:
            FeatureStore.create_or_open(out, encoder.identity(), tiling, overwrite=cfg.overwrite)
        except HistoclusterError as e:
            error = str(e)
    error = _broadcast(error, info)
    if error:
        raise HistoclusterError(error)
    store = FeatureStore.open(out, mode="r+")
    if info.is_main:
        resolved = {
            "encoder": encoder.info(),
            "tiling": tiling.to_attrs(),
            "precision": tile_encoder.precision,
            "device": str(device),
            "world_size": info.world_size,
            "workers": workers,
        }
        _write_json(out.with_name(out.name + ".config.json"), {**asdict(cfg), "resolved": resolved})

    # slides are prepared round-robin over ranks (tissue masks are the slow part)
    failures: dict[str, str] = {}
    for i, path in enumerate(paths):
        if i % info.world_size == info.rank:
            try:
                _prepare_slide(store, path, cfg, slide_mpp)
            except HistoclusterError as e:
                failures[str(path)] = str(e)
    for part in _gather(failures, info):
        failures.update(part)
    barrier()
    ready = [slide_id(p) for p in paths if str(p) not in failures]
    plan = make_plan(store, ready, cfg.batch_size, info.rank, info.world_size)
    path_of = {slide_id(p): str(p) for p in paths}

    # encode
    t_enc = time.perf_counter()
    writer = ChunkWriter(store, cfg.flush_every_s)
    failed_here: dict[str, str] = {}
    tiles_done = 0
    loader = DataLoader(
        TileBatches(plan),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )
    bar = tqdm(
        total=plan.n_tiles,
        unit="tile",
        desc=f"extract (rank {info.rank})" if info.distributed else "extract",
        disable=cfg.quiet or not info.is_main or not sys.stderr.isatty(),
        smoothing=0.1,
    )
    pending: tuple[int, torch.Tensor, Any] | None = None

    def finish(i: int, feats: torch.Tensor, event: Any) -> None:
        nonlocal tiles_done
        if event is not None:
            event.synchronize()
        sid = plan.jobs[int(plan.slide[i])].slide_id
        if sid in failed_here:
            return
        rows = plan.rows[plan.start[i] : plan.stop[i]]
        cols = plan.cols[plan.start[i] : plan.stop[i]]
        writer.add(sid, tuple(plan.chunk[i]), rows, cols, feats.numpy(), bool(plan.last[i]))
        tiles_done += len(rows)
        bar.update(len(rows))
        if progress is not None:
            progress(tiles_done, plan.n_tiles)

    if progress is not None:
        progress(0, plan.n_tiles)
    try:
        with torch.inference_mode():  # the CUDA host copies too
            for item in loader:
                i = int(item["index"])
                sid = plan.jobs[int(plan.slide[i])].slide_id
                if sid in failed_here:
                    continue
                if item["error"]:
                    if pending is not None:
                        finish(*pending)
                        pending = None
                    failed_here[sid] = item["error"]
                    writer.flush(sid)  # what was encoded is valid
                    continue
                feats = tile_encoder(item["tiles"])
                if device.type == "cuda":
                    host = torch.empty(feats.shape, dtype=feats.dtype, pin_memory=True)
                    host.copy_(feats, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    if pending is not None:
                        finish(*pending)
                    pending = (i, host, event)
                else:
                    finish(i, feats, None)
            if pending is not None:
                finish(*pending)
    finally:
        writer.flush()
        bar.close()
    encode_s = time.perf_counter() - t_enc

    # gather and summarise
    for sid, msg in failed_here.items():
        failures[path_of[sid]] = msg
    parts = _gather((tiles_done, encode_s, failures), info)
    barrier()
    all_failures: dict[str, str] = {}
    for _, _, f in parts:
        all_failures.update(f)
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
        failures=[{"slide": s, "error": m} for s, m in sorted(all_failures.items())],
        precision=tile_encoder.precision,
        device=str(device),
        world_size=info.world_size,
    )
    if info.is_main:
        _write_json(out.with_name(out.name + ".summary.json"), asdict(summary))
    return summary


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.extract",
        description="Encode the tissue tiles of whole-slide images into a zarr feature store "
        "(resumable; run under torchrun to split the tiles over processes / GPUs).",
    )
    p.add_argument(
        "slides",
        nargs="+",
        metavar="SLIDE_OR_DIR",
        help="slide files, or directories whose slide files to encode",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the feature store to write (features.zarr); an existing one is resumed",
    )
    p.add_argument(
        "--encoder",
        default=default_encoder_spec(),
        help="checkpoint path or named encoder, e.g. resnet18-random, ciga-resnet18 (default: %(default)s)",
    )
    p.add_argument(
        "--tile-px",
        type=int,
        default=224,
        help="tile side in pixels at --mpp (default: %(default)s)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=0.5,
        help="micrometres per pixel of the tiles (default: %(default)s)",
    )
    p.add_argument(
        "--stride-px",
        type=int,
        default=None,
        help="step between tiles in pixels at --mpp (default: --tile-px)",
    )
    p.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="encode tiles with at least this tissue fraction (default: %(default)s)",
    )
    p.add_argument(
        "--tissue",
        choices=TISSUE_METHODS,
        default="otsu",
        help="tissue detection method (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="tiles per encoder batch (default: %(default)s)"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="tile-reading worker processes per rank; 0 reads in the main process "
        f"(default: the rank's share of the CPUs minus one, 1 to 8; here {auto_workers()})",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto, cpu or cuda (default: %(default)s; auto = cuda when available)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="encoder precision; auto = bf16/fp16 on CUDA, bf16 on CPUs with native bf16, else fp32 (default: %(default)s)",
    )
    p.add_argument(
        "--slide-mpp",
        default=None,
        metavar="VALUE_OR_CSV",
        help="micrometres per pixel of slides whose files lack it (overrides the metadata): one number for all, or a CSV of slide,mpp rows",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing store made with another encoder or tiling",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow loading a checkpoint that needs pickle (only from a source you trust)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    return p


def parse_args(argv: Sequence[str] | None = None) -> ExtractConfig:
    a = build_parser().parse_args(argv)
    return ExtractConfig(
        slides=list(a.slides),
        out=a.out,
        encoder=a.encoder,
        tile_px=a.tile_px,
        mpp=a.mpp,
        stride_px=a.stride_px,
        min_tissue=a.min_tissue,
        tissue=a.tissue,
        batch_size=a.batch_size,
        workers=a.workers,
        device=a.device,
        precision=a.precision,
        slide_mpp=a.slide_mpp,
        overwrite=a.overwrite,
        quiet=a.quiet,
        trust_checkpoint=a.trust_checkpoint,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some slides failed, 2 the run could not start)."""
    cfg = parse_args(argv)
    try:
        try:
            summary = run(cfg)
        finally:
            cleanup()
    except HistoclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted — run the same command again to resume", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) != 0:
        return 1 if summary.failures else 0
    for f in summary.failures:
        print(f"error: {f['error']}", file=sys.stderr)
    if not cfg.quiet:
        failed = (
            f"; {len(summary.failures)} failed: {', '.join(Path(f['slide']).name for f in summary.failures)}"
            if summary.failures
            else ""
        )
        print(
            f"extracted {summary.tiles} tiles ({summary.tiles_already_done} already done) from "
            f"{summary.slides} slide(s) in {summary.seconds:.1f} s ({summary.tiles_per_s:.1f} tiles/s, "
            f"{summary.precision} on {summary.device}){failed} -> {cfg.out}",
            file=sys.stderr,
        )
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
