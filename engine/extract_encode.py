"""The torch half of extraction: the encoder on its device, the rank collectives, and the loop
that reads, encodes and writes every batch of a plan.

:mod:`engine.extract` imports this module in the thread that loads the encoder, so ``import
torch`` (about 2 s on a 2-core CPU) runs while the main thread computes the first tissue masks.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from engine.chunk_writer import ChunkWriter
from engine.device_tiles import DeviceTileDecoder, SourceBatches, item_tiles
from engine.distributed import DistInfo, barrier, init_distributed
from engine.encode import TileEncoder
from engine.errors import HistoclusterError
from engine.extract_plan import Plan
from engine.heap import retained_heap
from engine.launcher_env import env_int
from engine.models import load_encoder
from engine.progress import Progress
from engine.store import FeatureStore
from engine.tile_reader import TileBatches, read_batches

if TYPE_CHECKING:
    from engine.extract import ExtractConfig

__all__ = [
    "BATCH_MULTIPLE",
    "Encoded",
    "Encoding",
    "barrier",
    "broadcast",
    "encode_plan",
    "gather",
    "join_distributed",
    "start",
]


BATCH_MULTIPLE = 16
"""Batches are encoded padded to a multiple of this: at most 4 shapes for --batch-size 64, so the
retained heap settles after the first few chunks whatever the slide's size (with 8 shapes a
large slide met shapes later, and grew the heap, that a smaller one never met). On the
generated 40x slide 2.9% of the tiles encoded are padding. See :class:`~engine.encode.TileEncoder`."""


@dataclass(frozen=True)
class Encoding:
    """Where this process encodes (its rank, world and device) and the encoder loaded there."""

    info: DistInfo
    tile_encoder: TileEncoder


def join_distributed(device: str) -> DistInfo:
    """torchrun's process group (or this single process) on ``device``, once it is known to exist."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HistoclusterError(
            f"--device {device}: no CUDA device is available — use --device cpu or auto"
        )
    info = init_distributed(device)
    local_world = env_int("LOCAL_WORLD_SIZE", info.world_size)
    if info.distributed and info.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return info


def start(cfg: ExtractConfig, info: DistInfo | None) -> Encoding:
    """``cfg.encoder`` on this process's device at ``cfg.precision``; ``info`` None joins the
    (single-process) group here. Runs in a thread: CUDA's current device is per thread, so it is
    set here too."""
    info = info or join_distributed(cfg.device)
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    encoder = load_encoder(cfg.encoder, trust_checkpoint=cfg.trust_checkpoint)
    tile_encoder = TileEncoder(
        encoder, info.device, cfg.precision, cfg.channels_last, batch_multiple=BATCH_MULTIPLE
    )
    return Encoding(info, tile_encoder)


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@dataclass
class Encoded:
    """What this rank's encoding did: tiles encoded, slides that failed, unreadable tiles."""

    tiles: int = 0
    slide_errors: dict[str, str] = field(default_factory=dict)  # {slide id: error}
    tile_errors: dict[str, str] = field(default_factory=dict)  # {slide id: first tile error}
    notes: list[str] = field(default_factory=list)  # the device decoder's fallbacks


def encode_plan(
    plan: Plan,
    store: FeatureStore,
    tile_encoder: TileEncoder,
    workers: int,
    cfg: ExtractConfig,
    progress: Progress,
) -> Encoded:
    """Read, encode and write every batch of ``plan`` (in the thread that called it). On the
    CPU the loop runs in a :func:`~engine.heap.retained_heap` (its reader workers, forked inside,
    too): each batch reuses the previous one's memory instead of page-faulting it in again."""
    with retained_heap() if tile_encoder.device.type == "cpu" else nullcontext():
        device = tile_encoder.device
        if device.type == "cuda":  # the current device is per thread: the events below use it
            torch.cuda.set_device(device)
        writer = ChunkWriter(store, cfg.flush_every_s)
        result = Encoded()
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
                    feats = tile_encoder(
                        item["tiles"]
                    )  # unreadable tiles are white: same batch shape
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
            try:
                writer.flush()  # may raise (a full disk): the readers are closed all the same
            finally:
                batches.close()
        result.notes = decoder.notes if decoder is not None else []
        return result
