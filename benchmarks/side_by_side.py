"""What the extraction benchmarks share: CPU seconds, the extractor's batches decoded in memory,
the encoder-only ceiling on them, rounds interleaved with ceilings, and the printed table.

Used by ``benchmarks/extract.py`` (ResNet-18 on the generated 40x slide) and
``benchmarks/extract_vit.py`` (the registry ViTs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.encode import TileEncoder
from engine.extract import ExtractConfig, Plan, make_plan, run
from engine.heap import retained_heap
from engine.models import load_encoder
from engine.slide import open_slide, slide_id
from engine.store import FeatureStore
from engine.tile_reader import TileBatches, read_batches
from engine.tiling import TileGrid


def cpu_s() -> float:
    """CPU seconds of this process and its reaped children (reader workers), user + system."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def plan_of(cfg: ExtractConfig, folder: Path) -> Plan:
    """The batches ``engine.extract`` would encode for ``cfg.slides[0]`` (a fresh store in ``folder``)."""
    path = Path(cfg.slides[0])
    with open_slide(path) as slide:
        grid = TileGrid.from_tiling(slide, cfg.tiling)
        grid.tissue  # noqa: B018 - computed while the slide is open
    store = FeatureStore.create_or_open(
        folder / "plan.zarr", load_encoder(cfg.encoder).identity(), cfg.tiling
    )
    store.add_slide(slide_id(path), grid)
    return make_plan(store, [slide_id(path)], cfg.batch_size, reader=cfg.reader)


def middle(plan: Plan, n_tiles: int | None) -> Plan:
    """The whole batches of ``plan`` nearest its middle holding at least ``n_tiles`` tiles (all: None)."""
    if n_tiles is None or n_tiles >= plan.n_tiles:
        return plan
    sizes = plan.stop - plan.start
    k = max(1, int(np.searchsorted(np.cumsum(sizes), n_tiles)) + 1)
    b0 = max(0, (len(plan) - k) // 2)
    b = slice(b0, b0 + k)
    t0, t1 = int(plan.start[b0]), int(plan.stop[b0 + k - 1])
    return Plan(
        plan.jobs,
        plan.rows[t0:t1],
        plan.cols[t0:t1],
        plan.slide[b],
        plan.chunk[b],
        plan.start[b] - t0,
        plan.stop[b] - t0,
        plan.last[b],
    )


def read_only(plan: Plan, workers: int) -> tuple[float, float, list[torch.Tensor]]:
    """Read every batch of ``plan`` as extraction does (``workers`` reader processes, 0: here),
    nothing else: (tiles/s, CPU s per tile of this process and its workers, the batches
    (B,H,W,3) uint8 when read here, else [])."""
    keep: list[torch.Tensor] = []
    n, t, c = 0, time.perf_counter(), cpu_s()
    with retained_heap():  # as extraction's loop reads
        for item in read_batches(TileBatches(plan), workers):
            if item["error"]:
                raise SystemExit(item["error"])
            n += len(item["tiles"])
            if workers == 0:
                keep.append(item["tiles"])
    return n / (time.perf_counter() - t), (cpu_s() - c) / max(1, n), keep


def tiles_in_memory(
    cfg: ExtractConfig, n_tiles: int | None = None
) -> tuple[list[torch.Tensor], float]:
    """The extractor's batches of ``cfg.slides[0]`` (``n_tiles`` of them from mid-slide, or all)
    decoded in memory as (B,H,W,3) uint8 tensors, and the CPU seconds per tile reading took."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = middle(plan_of(cfg, Path(tmp)), n_tiles)
        _, cpu, batches = read_only(plan, 0)
    return batches, cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(encode: TileEncoder, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(tiles/s, CPU s/tile) of ``encode`` over ``batches``, after a warm-up batch, in the
    retained heap extraction's CPU loop runs in."""
    with retained_heap() if encode.device.type == "cpu" else contextlib.nullcontext():
        encode(batches[0][:4])
        _sync(encode.device)
        n, t, c = 0, time.perf_counter(), cpu_s()
        for b in batches:
            encode(b)
            n += len(b)
        _sync(encode.device)
    return n / (time.perf_counter() - t), (cpu_s() - c) / n


def end_to_end(cfg: ExtractConfig) -> dict[str, float]:
    """One ``engine.extract.run`` of ``cfg`` in this process into a fresh store: loop and run
    tiles/s, CPU s per tile of the run (main process and reader workers)."""
    with tempfile.TemporaryDirectory() as tmp:
        c = cpu_s()
        s = run(dataclasses.replace(cfg, out=str(Path(tmp) / "features.zarr"), quiet=True))
        return {"loop": s.encode_tiles_per_s, "run": s.tiles_per_s, "cpu": (cpu_s() - c) / s.tiles}


def interleaved(
    ceil: Callable[[], tuple[float, float]],
    e2e: Callable[[], dict[str, float]],
    rounds: int,
) -> dict[str, Any]:
    """Ceilings and end-to-end runs alternating (ceiling, run, ceiling, ...); ratios are medians
    over the runs, each against the mean of the ceilings measured either side of it."""
    ceils = [ceil()]
    runs = []
    for _ in range(rounds):
        runs.append(e2e())
        ceils.append(ceil())
    around = [
        ((ceils[k][0] + ceils[k + 1][0]) / 2, (ceils[k][1] + ceils[k + 1][1]) / 2)
        for k in range(len(runs))
    ]
    pairs = list(zip(runs, around, strict=True))
    return {
        "ceil": float(np.mean([c[0] for c in ceils])),
        "loop": float(np.mean([r["loop"] for r in runs])),
        "run": float(np.mean([r["run"] for r in runs])),
        "loop/ceil": float(np.median([r["loop"] / w for r, (w, _) in pairs])),
        "run/ceil": float(np.median([r["run"] / w for r, (w, _) in pairs])),
        "cpu ceil/run": float(np.median([c / r["cpu"] for r, (_, c) in pairs])),
        "detail": "ceilings "
        + ", ".join(f"{c[0]:.2f}" for c in ceils)
        + "; loops "
        + ", ".join(f"{r['loop']:.2f}" for r in runs),
    }


def print_table(
    rows: Sequence[dict[str, Any]], cols: Sequence[str], first: str = "setting"
) -> None:
    """One line per row: ``first`` left-aligned, then ``cols`` as numbers, then its ``detail``."""
    width = max([len(first)] + [len(str(r[first])) for r in rows]) + 2
    print(f"{first:<{width}}" + "".join(f"{c:>14}" for c in cols))
    for row in rows:
        detail = f"   ({row['detail']})" if row.get("detail") else ""
        print(f"{row[first]!s:<{width}}" + "".join(f"{row[c]:>14.3f}" for c in cols) + detail)
