#!/usr/bin/env python
"""Tiles/s of device-side JPEG decoding vs the CPU reduced-size decode vs OpenSlide, same tiles.

    .venv/bin/python benchmarks/device_decode.py [SLIDE] [--scale 0.25] [--tiles 512]
                                                 [--batch 256] [--rounds 3] [--mpp 0.5]
                                                 [--tile-px 224] [--device cuda|cpu]
                                                 [--encode] [--workers 4]

Without SLIDE it reads the generated 40x benchmark slide (``benchmarks/make_40x_slide.py``,
0.25 um/px, written once into ``$TMPDIR/histocluster-bench`` and reused; ``--scale 1`` is the
real-sized 88,800 x 71,208 px slide). The tiles are the extractor's: ``--tiles`` consecutive
tissue tiles of the ``TileGrid`` (row-major, as a worker reads its batches), from mid-slide.

Each round reads them all once per path, in this process, the order rotating by round:

- ``openslide``: ``Slide.read_tile_at_mpp`` (OpenSlide region + Pillow antialiased resize);
- ``jpeg-cpu``: ``engine.jpeg_tiles.JpegTileReader`` (libjpeg-turbo DCT-scaled decode, CPU);
- ``device``: ``engine.device_tiles``: the worker's part (``JpegSources.plan``: which source
  tiles, their bytes) timed apart from the device's part (``DeviceTileDecoder``: batched
  ``decode_jpeg(device=...)``, gather, antialiased resize), batches of ``--batch`` tiles.

Reported per path: tiles per CPU second of this process (per core, what the CPU pays) and wall
tiles/s; for the device path also the worker's part alone (what each DataLoader worker must
sustain), and on CUDA the GPU-busy fraction of the decode (the CUDA-event span of each batch's
device work over wall time: an upper bound, gaps inside a batch count as busy) and the peak
device memory. ``--encode`` adds an end-to-end run as extraction would do it on the
device: ``SourceBatches`` read by ``--workers`` DataLoader workers, decoded on the device and
encoded by ResNet-18 (random seeded weights, precision auto), with the GPU-busy fraction of
that loop. The load average is printed with the figures (the cores may be shared).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_40x_slide import make_40x_slide  # noqa: E402

from engine.device_tiles import DeviceTileDecoder, JpegSources, SourceBatches, item_tiles  # noqa: E402
from engine.encode import TileEncoder  # noqa: E402
from engine.extract import Plan  # noqa: E402
from engine.jpeg_tiles import JpegTileReader  # noqa: E402
from engine.models import load_encoder  # noqa: E402
from engine.slide import open_slide  # noqa: E402
from engine.tile_reader import SlideJob, read_batches  # noqa: E402
from engine.tiling import TileGrid  # noqa: E402

warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")

PATHS = ("openslide", "jpeg-cpu", "device")


def pick_tiles(grid: TileGrid, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of ``n`` consecutive tissue tiles (row-major) from mid-slide."""
    rows, cols = np.nonzero(grid.selected)
    if not len(rows):
        raise SystemExit(f"{grid.slide.path}: no tissue tiles")
    start = max(0, min(len(rows) // 2 - n // 2, len(rows) - n))
    return rows[start : start + n], cols[start : start + n]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_path(kind: str, path: Path, origins: np.ndarray, a, decoder: DeviceTileDecoder) -> dict:
    """One pass of ``kind`` over ``origins``: CPU s, wall s (and the device path's parts)."""
    out: dict = {}
    cpu, wall = time.process_time(), time.perf_counter()
    with open_slide(path) as slide:
        if kind == "openslide":
            for xy in origins:
                slide.read_tile_at_mpp(tuple(int(v) for v in xy), a.mpp, a.tile_px)
        elif kind == "jpeg-cpu":
            reader = JpegTileReader.from_slide(slide)
            if reader is None or not reader.fits(a.mpp, a.tile_px):
                return {}
            with reader:
                for xy in origins:
                    reader.read_tile(tuple(int(v) for v in xy), a.mpp, a.tile_px)
        else:
            src = JpegSources.from_slide(slide)
            if src is None or not src.fits(a.mpp):
                return {}
            plan_cpu = plan_wall = 0.0
            gpu_s = 0.0
            with src:
                for s in range(0, len(origins), a.batch):
                    c0, w0 = time.process_time(), time.perf_counter()
                    batch = src.plan(origins[s : s + a.batch], a.mpp, a.tile_px)
                    plan_cpu += time.process_time() - c0
                    plan_wall += time.perf_counter() - w0
                    if decoder.device.type == "cuda":
                        start, end = torch.cuda.Event(True), torch.cuda.Event(True)
                        start.record()
                        decoder(batch)
                        end.record()
                        end.synchronize()
                        gpu_s += start.elapsed_time(end) / 1000
                    else:
                        decoder(batch)
            out.update(plan_cpu=plan_cpu, plan_wall=plan_wall, gpu_s=gpu_s)
    sync(decoder.device)
    out.update(cpu=time.process_time() - cpu, wall=time.perf_counter() - wall)
    return out


def end_to_end(path: Path, grid: TileGrid, rows, cols, a, device: torch.device) -> dict:
    """SourceBatches in ``a.workers`` workers -> device decode -> ResNet-18, like extraction."""
    with open_slide(path) as slide:
        xs, ys = grid.origins[0, :, 0].copy(), grid.origins[:, 0, 1].copy()
        job = SlideJob("bench", str(path), slide.mpp, a.mpp, a.tile_px, xs, ys, "auto")
    starts = np.arange(0, len(rows), a.batch)
    stops = np.minimum(starts + a.batch, len(rows))
    n = len(starts)
    plan = Plan([job], rows, cols, np.zeros(n, np.int64), np.zeros((n, 2), np.int32),
                starts, stops, np.zeros(n, bool))  # fmt: skip
    torch.manual_seed(0)
    encoder = TileEncoder(load_encoder("resnet18-random"), device, "auto")
    decoder = DeviceTileDecoder(device)
    dataset = SourceBatches(plan)
    warm = item_tiles(dataset[0], decoder)
    encoder(warm["tiles"])  # cudnn autotuning, lazy inits
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    events, tiles = [], 0
    with torch.inference_mode():
        for item in read_batches(dataset, a.workers, pin_memory=device.type == "cuda"):
            if device.type == "cuda":
                events.append((torch.cuda.Event(True), torch.cuda.Event(True)))
                events[-1][0].record()
            feats = encoder(item_tiles(item, decoder)["tiles"])
            if device.type == "cuda":
                events[-1][1].record()
            tiles += len(feats)
    sync(device)
    gpu_s = sum(s.elapsed_time(e) for s, e in events) / 1000
    return {"tiles": tiles, "cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall,
            "gpu_s": gpu_s, "precision": encoder.precision}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("slide", nargs="?", help="a slide (default: the generated 40x slide)")
    p.add_argument("--scale", type=float, default=0.25, help="of the generated slide's sides")
    p.add_argument("--tiles", type=int, default=512)
    p.add_argument("--batch", type=int, default=256, help="tiles per device batch")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--encode", action="store_true", help="also run read+decode+ResNet-18")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers for --encode")
    p.add_argument("--bench-dir", default=str(Path(tempfile.gettempdir()) / "histocluster-bench"))
    a = p.parse_args(argv)
    device = torch.device(a.device)
    path = Path(a.slide) if a.slide else make_40x_slide(a.bench_dir, scale=a.scale)  # or reuse
    with open_slide(path) as slide:
        grid = TileGrid(slide, a.mpp, a.tile_px)
        print(
            f"{path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px at "
            f"{slide.mpp[0]:.4g} um/px, {slide.level_count} levels; tiles {a.tile_px} px at "
            f"{a.mpp} um/px (level {grid.level}, read {grid.read_size}); device {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        )
        rows, cols = pick_tiles(grid, a.tiles)
        origins = grid.origins[rows, cols]
    decoder = DeviceTileDecoder(device)
    read_path("device", path, origins[: a.batch], a, decoder)  # warm-up: decoder, kernels
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    print(f"{len(origins)} consecutive tissue tiles, batches of {a.batch}, {a.rounds} rounds; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    runs: dict[str, list[dict]] = {k: [] for k in PATHS}
    for r in range(a.rounds):
        order = PATHS[r % 3 :] + PATHS[: r % 3]
        for kind in order:
            got = read_path(kind, path, origins, a, decoder)
            if got:
                runs[kind].append(got)
        line = ", ".join(f"{k} {len(origins) / runs[k][-1]['wall']:.0f}" for k in PATHS if runs[k])
        print(f"  round {r + 1}: wall tiles/s {line}")
    n = len(origins)
    med = {k: {f: float(np.median([g[f] for g in v])) for f in v[0]} for k, v in runs.items() if v}
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for k, m in med.items():
        print(f"{k:10s} {n / m['cpu']:7.0f} tiles per CPU s, {n / m['wall']:7.0f} tiles/s wall")
    if "device" in med:
        m = med["device"]
        print(
            f"device path, worker part (plan + pread) alone: {n / m['plan_cpu']:.0f} tiles per "
            f"CPU s, {n / m['plan_wall']:.0f} tiles/s wall"
        )
        if device.type == "cuda":
            dec_wall = m["wall"] - m["plan_wall"]
            print(
                f"device decode: {n / dec_wall:.0f} tiles/s; GPU stream span {m['gpu_s'] / dec_wall:.0%} "
                f"of the decode's wall time (CUDA events: an upper bound on busy); peak memory "
                f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
            )
        for k in ("openslide", "jpeg-cpu"):
            if k in med:
                print(f"device path vs {k}: {med[k]['wall'] / m['wall']:.2f}x wall, "
                      f"{med[k]['cpu'] / m['cpu']:.2f}x per CPU s")  # fmt: skip
    for note in decoder.notes:
        print(f"note: {note}")
    if a.encode:
        e = end_to_end(path, grid, rows, cols, a, device)
        busy = f", GPU stream span {e['gpu_s'] / e['wall']:.0%} of wall" if e["gpu_s"] else ""
        print(
            f"end to end ({a.workers} workers read bytes -> {device} decode -> ResNet-18 "
            f"{e['precision']}): {e['tiles'] / e['wall']:.0f} tiles/s, "
            f"{e['cpu'] / e['tiles'] * 1000:.2f} ms main-process CPU per tile{busy}; load average "
            f"{os.getloadavg()[0]:.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
