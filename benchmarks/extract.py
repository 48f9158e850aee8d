"""Extraction throughput: end-to-end tiles/s vs the encoder-only ceiling, side by side.

    .venv/bin/python benchmarks/extract.py [SLIDE] [--encoder SPEC] [--batch-size 64]
                                           [--workers N] [--rounds 2]

On ``../shared/data/slides/CMU-1-Small-Region.svs`` (224 px tiles at 0.5 um/px, stride 112 px
so there are enough tiles for a steady state) it measures, per CPU setting:

- ceiling: ``TileEncoder`` (normalisation + model: the code the extractor runs) on the slide's
  tiles already decoded in memory, with the same model, precision and batches;
- end-to-end: ``engine.extract.run`` into a fresh store: the encode loop (DataLoader workers
  reading and decoding, encoding, zarr writes) and the whole run (plus tissue mask, encoder
  load, worker start-up).

Two ratios each: wall-clock tiles/s, and CPU seconds per tile (main process plus reader
workers), which stays meaningful when other jobs share the cores. Settings: fp32 (contiguous
NCHW), the fastest of fp32/bf16 with channels_last by a quick probe, and that one with
``--workers 0`` (reading in the main process). Ceiling and end-to-end runs alternate, and each
end-to-end run is compared with the mean of the ceilings measured either side of it.
Goal: loop / ceiling >= 0.9.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engine.encode import TileEncoder, cpu_supports_bf16
from engine.extract import ExtractConfig, auto_workers, make_plan, run
from engine.models import default_encoder_spec, load_encoder
from engine.slide import open_slide, slide_id
from engine.store import FeatureStore
from engine.tiling import TileGrid

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
TILE_PX, MPP, STRIDE_PX = 224, 0.5, 112


def _cpu_s() -> float:
    """CPU seconds of this process and its reaped children (reader workers), user + system."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def tiles_in_memory(
    slide_path: Path, encoder_spec: str, batch_size: int
) -> tuple[list[torch.Tensor], float]:
    """The batches the extractor encodes, as (B,224,224,3) uint8 tensors already decoded, and the
    CPU seconds per tile that reading + decoding them took."""
    with tempfile.TemporaryDirectory() as tmp, open_slide(slide_path) as slide:
        grid = TileGrid(slide, MPP, TILE_PX, STRIDE_PX)
        store = FeatureStore.create_or_open(
            Path(tmp) / "f.zarr", load_encoder(encoder_spec).identity(), grid.tiling
        )
        store.add_slide(slide_id(slide_path), grid)
        plan = make_plan(store, [slide_id(slide_path)], batch_size)
        cpu = time.process_time()
        out = []
        for i in range(len(plan)):
            rows = plan.rows[plan.start[i] : plan.stop[i]]
            cols = plan.cols[plan.start[i] : plan.stop[i]]
            tiles = [grid.read_tile(int(r), int(c)) for r, c in zip(rows, cols, strict=True)]
            out.append(torch.from_numpy(np.stack(tiles)))
        return out, (time.process_time() - cpu) / plan.n_tiles


def ceiling(encode: TileEncoder, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(tiles/s, CPU s/tile) of ``encode`` over ``batches``, after a warm-up batch."""
    encode(batches[0][:8])
    n, t, c = 0, time.perf_counter(), _cpu_s()
    for b in batches:
        encode(b)
        n += len(b)
    return n / (time.perf_counter() - t), (_cpu_s() - c) / n


def end_to_end(
    slide: Path, spec: str, precision: str, channels_last: bool, batch_size: int, workers: int
) -> dict[str, float]:
    """One ``engine.extract.run`` into a fresh store: loop and run tiles/s, CPU s/tile of the run."""
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
        c = _cpu_s()
        s = run(cfg)
        return {"loop": s.encode_tiles_per_s, "run": s.tiles_per_s, "cpu": (_cpu_s() - c) / s.tiles}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("slide", nargs="?", default=str(CMU))
    p.add_argument("--encoder", default=default_encoder_spec())
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=auto_workers())
    p.add_argument("--rounds", type=int, default=2, help="end-to-end runs per setting")
    a = p.parse_args()
    slide = Path(a.slide)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_supports_bf16()}, "
        f"load average {os.getloadavg()[0]:.1f}; encoder {a.encoder}, batch {a.batch_size}, "
        f"workers {a.workers}, {a.rounds} rounds"
    )
    batches, read_cpu = tiles_in_memory(slide, a.encoder, a.batch_size)
    print(
        f"{slide.name}: {sum(len(b) for b in batches)} tiles of {TILE_PX} px at {MPP} um/px "
        f"(stride {STRIDE_PX} px); reading + decoding costs {read_cpu * 1000:.1f} ms CPU per tile"
    )

    cpu = torch.device("cpu")
    candidates = {"fp32+channels_last": ("fp32", True), "bf16+channels_last": ("bf16", True)}
    probe = [batches[0][:16]]
    quick = {
        n: ceiling(TileEncoder(load_encoder(a.encoder), cpu, pr, cl), probe)[0]
        for n, (pr, cl) in candidates.items()
    }
    fastest = max(quick, key=quick.__getitem__)
    print(
        "probe on 16 tiles (tiles/s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in quick.items())
        + f" -> fastest {fastest}"
    )

    settings = [
        ("fp32", "fp32", False, a.workers),
        (fastest, *candidates[fastest], a.workers),
        (f"{fastest}, workers 0", *candidates[fastest], 0),
    ]
    table = []
    for name, precision, channels_last, workers in settings:
        enc = TileEncoder(load_encoder(a.encoder), cpu, precision, channels_last)
        ceils = [ceiling(enc, batches)]
        runs = []
        for _ in range(a.rounds):
            runs.append(
                end_to_end(slide, a.encoder, precision, channels_last, a.batch_size, workers)
            )
            ceils.append(ceiling(enc, batches))
        around = [
            ((ceils[k][0] + ceils[k + 1][0]) / 2, (ceils[k][1] + ceils[k + 1][1]) / 2)
            for k in range(len(runs))
        ]
        row = {
            "setting": name,
            "ceil": float(np.mean([c[0] for c in ceils])),
            "loop": float(np.mean([r["loop"] for r in runs])),
            "run": float(np.mean([r["run"] for r in runs])),
            "loop/ceil": float(
                np.median([r["loop"] / w for r, (w, _) in zip(runs, around, strict=True)])
            ),
            "run/ceil": float(
                np.median([r["run"] / w for r, (w, _) in zip(runs, around, strict=True)])
            ),
            "cpu ceil/run": float(
                np.median([c / r["cpu"] for r, (_, c) in zip(runs, around, strict=True)])
            ),
            "detail": "ceilings "
            + ", ".join(f"{c[0]:.2f}" for c in ceils)
            + "; loops "
            + ", ".join(f"{r['loop']:.2f}" for r in runs),
        }
        table.append(row)
        print(row, flush=True)

    print()
    cols = ["ceil", "loop", "run", "loop/ceil", "run/ceil", "cpu ceil/run"]
    print(f"{'setting':<30}" + "".join(f"{c:>14}" for c in cols))
    for row in table:
        print(
            f"{row['setting']:<30}"
            + "".join(f"{row[c]:>14.3f}" for c in cols)
            + f"   ({row['detail']})"
        )
    print(
        "ceil/loop/run in tiles/s (means); ratios are medians over rounds, each run against the "
        "ceilings either side; cpu ceil/run = encoder-only CPU s per tile / whole-run CPU s per tile "
        "(main + reader workers, incl. tissue mask and start-up). Goal loop/ceil >= 0.9."
    )


if __name__ == "__main__":
    main()
