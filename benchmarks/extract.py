"""Extraction throughput: end-to-end tiles/s vs the encoder-only ceiling, side by side.

    .venv/bin/python benchmarks/extract.py [SLIDE] [--encoder SPEC] [--batch-size 64] [--workers N]

On ``../shared/data/slides/CMU-1-Small-Region.svs`` (224 px tiles at 0.5 um/px, stride 112 px
so there are enough tiles to reach a steady state) it measures, for each CPU setting:

- ceiling: ``TileEncoder`` (normalisation + model, the same code the extractor runs) on the
  slide's tiles already decoded in memory, same model, precision and batches;
- end-to-end: ``engine.extract.run`` into a fresh store (tissue masks, DataLoader workers
  reading and decoding, encoding, zarr writes): rate of the encode loop and of the whole run.

The goal is encode-loop tiles/s >= 0.9 x ceiling: reading is never the bottleneck. Settings:
fp32 (contiguous), then the fastest of fp32+channels_last / bf16+channels_last by ceiling.
The ceiling is measured before and after each end-to-end run (the machine is shared) and averaged.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.extract import ExtractConfig, TileEncoder, make_plan, run
from engine.models import default_encoder_spec, load_encoder
from engine.slide import open_slide, slide_id
from engine.store import FeatureStore
from engine.tiling import TileGrid

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
TILE_PX, MPP, STRIDE_PX = 224, 0.5, 112


def tiles_in_memory(slide_path: Path, encoder_spec: str, batch_size: int) -> list[torch.Tensor]:
    """The batches the extractor will encode, as (B,224,224,3) uint8 tensors already decoded."""
    with tempfile.TemporaryDirectory() as tmp, open_slide(slide_path) as slide:
        grid = TileGrid(slide, MPP, TILE_PX, STRIDE_PX)
        store = FeatureStore.create_or_open(
            Path(tmp) / "f.zarr", load_encoder(encoder_spec).info(), grid.describe()
        )
        store.add_slide(slide_id(slide_path), grid)
        plan = make_plan(store, [slide_id(slide_path)], batch_size)
        out = []
        for i in range(len(plan)):
            rows = plan.rows[plan.start[i] : plan.stop[i]]
            cols = plan.cols[plan.start[i] : plan.stop[i]]
            out.append(
                torch.from_numpy(
                    np.stack(
                        [grid.read_tile(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
                    )
                )
            )
        return out


def ceiling(
    encode: TileEncoder, batches: list[torch.Tensor], max_tiles: int | None = None
) -> float:
    """Tiles/s of ``encode`` over ``batches`` (after one warm-up batch)."""
    encode(batches[0][:8])
    n, t = 0, time.perf_counter()
    for b in batches:
        encode(b)
        n += len(b)
        if max_tiles is not None and n >= max_tiles:
            break
    return n / (time.perf_counter() - t)


def end_to_end(
    slide: Path, spec: str, precision: str, channels_last: bool, batch_size: int, workers: int
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExtractConfig(
            slides=[str(slide)],
            out=str(Path(tmp) / "features.zarr"),
            encoder=spec,
            tile_px=TILE_PX,
            mpp=MPP,
            stride_px=STRIDE_PX,
            batch_size=batch_size,
            workers=workers,
            device="cpu",
            precision=precision,
            quiet=True,
            channels_last=channels_last,
        )
        s = run(cfg)
        return {"tiles": s.tiles, "run": s.tiles_per_s, "loop": s.encode_tiles_per_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("slide", nargs="?", default=str(CMU))
    p.add_argument("--encoder", default=default_encoder_spec())
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    a = p.parse_args()
    slide = Path(a.slide)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, encoder {a.encoder}, "
          f"batch {a.batch_size}, workers {a.workers}")  # fmt: skip
    batches = tiles_in_memory(slide, a.encoder, a.batch_size)
    n_tiles = sum(len(b) for b in batches)
    print(f"{slide.name}: {n_tiles} tiles of {TILE_PX} px at {MPP} um/px (stride {STRIDE_PX} px)")

    encoder = load_encoder(a.encoder)
    cpu = torch.device("cpu")
    candidates = {"fp32+channels_last": ("fp32", True), "bf16+channels_last": ("bf16", True)}
    quick = {name: ceiling(TileEncoder(encoder, cpu, prec, cl), batches, max_tiles=a.batch_size)
             for name, (prec, cl) in candidates.items()}  # fmt: skip
    fastest = max(quick, key=quick.__getitem__)
    print(
        "quick ceilings (tiles/s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in quick.items())
        + f" -> fastest: {fastest}"
    )

    settings = {"fp32": ("fp32", False), fastest: candidates[fastest]}
    rows = []
    for name, (prec, cl) in settings.items():
        enc = TileEncoder(load_encoder(a.encoder), cpu, prec, cl)
        before = ceiling(enc, batches)
        e2e = end_to_end(slide, a.encoder, prec, cl, a.batch_size, a.workers)
        after = ceiling(enc, batches)
        ceil = (before + after) / 2
        rows.append((name, ceil, before, after, e2e))
    e2e0 = end_to_end(slide, a.encoder, *settings[fastest], a.batch_size, 0)

    print()
    print(
        f"{'setting':<22}{'ceiling':>9}{'(before/after)':>17}{'loop':>8}{'run':>8}{'loop/ceil':>11}{'run/ceil':>10}"
    )
    for name, ceil, before, after, e2e in rows:
        print(f"{name:<22}{ceil:>9.2f}{f'({before:.2f}/{after:.2f})':>17}{e2e['loop']:>8.2f}{e2e['run']:>8.2f}"
              f"{e2e['loop'] / ceil:>11.3f}{e2e['run'] / ceil:>10.3f}")  # fmt: skip
    ceil_fast = rows[-1][1]
    print(f"{fastest + ', workers 0':<22}{ceil_fast:>9.2f}{'':>17}{e2e0['loop']:>8.2f}{e2e0['run']:>8.2f}"
          f"{e2e0['loop'] / ceil_fast:>11.3f}{e2e0['run'] / ceil_fast:>10.3f}")  # fmt: skip
    print("tiles/s; loop = encode loop of engine.extract.run (reading in workers, encoding, zarr writes); "
          "run = whole command incl. tissue masks, encoder load and worker start-up. Goal loop/ceil >= 0.9.")  # fmt: skip


if __name__ == "__main__":
    main()
