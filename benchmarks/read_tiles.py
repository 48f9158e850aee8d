#!/usr/bin/env python
"""Read-only tiles/s per core: the OpenSlide path vs reduced-size JPEG decoding, same tiles.

    .venv/bin/python benchmarks/read_tiles.py [SLIDE] [--scale 0.25] [--tiles 600]
                                              [--rounds 3] [--mpp 0.5] [--tile-px 224]
                                              [--decoder simplejpeg|pillow]

Without SLIDE it reads the generated 40x benchmark slide (``benchmarks/make_40x_slide.py``,
0.25 um/px, written once into ``$TMPDIR/histocluster-bench`` and reused; ``--scale 1`` is the
real-sized 88,800 x 71,208 px slide, a few minutes to write the first time). The tiles are the
extractor's: ``--tiles`` consecutive tissue tiles of the ``TileGrid`` (row-major, as a worker
reads its batches), from the middle of the slide.

Each round reads them all once per reader, on a freshly opened slide (cold caches), in the main
process: ``Slide.read_tile_at_mpp`` (OpenSlide region + antialiased resize) and
``engine.jpeg_tiles.JpegTileReader.read_tile``; the order of the two alternates by round.
Reported: tiles per CPU second of this process (per core, meaningful on a busy machine), wall
tiles/s, the median ratio over rounds (goal >= 2x), and the PSNR of the two readers' tiles.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from make_40x_slide import make_40x_slide  # noqa: E402

from engine.jpeg_tiles import JpegTileReader, decoder_name  # noqa: E402
from engine.slide import open_slide  # noqa: E402
from engine.tiling import TileGrid  # noqa: E402


def pick_tiles(slide_path: Path, mpp: float, tile_px: int, n: int) -> list[tuple[int, int]]:
    """``n`` consecutive tissue tiles (row-major) of the extractor's grid, from mid-slide."""
    with open_slide(slide_path) as slide:
        grid = TileGrid(slide, mpp, tile_px)
        rows, cols = np.nonzero(grid.selected)
        if not len(rows):
            raise SystemExit(f"{slide_path}: no tissue tiles")
        start = max(0, min(len(rows) // 2 - n // 2, len(rows) - n))
        return [grid.origin(int(r), int(c)) for r, c in zip(rows, cols, strict=True)][
            start : start + n
        ]


def read_all(
    kind: str, path: Path, xys: list[tuple[int, int]], mpp: float, px: int, decoder: str = ""
):
    """Read every tile with a fresh reader of ``kind``; (CPU s, wall s, tiles (N, px, px, 3))."""
    out = np.empty((len(xys), px, px, 3), np.uint8)
    cpu, wall = time.process_time(), time.perf_counter()
    with open_slide(path) as slide:
        if kind == "openslide":
            for k, xy in enumerate(xys):
                out[k] = slide.read_tile_at_mpp(xy, mpp, px)
        else:
            reader = JpegTileReader.from_slide(slide)
            if reader is None or not reader.fits(mpp, px):
                raise SystemExit(f"{path}: not readable by JpegTileReader at {mpp} um/px")
            reader.decoder = decoder or reader.decoder
            with reader:
                for k, xy in enumerate(xys):
                    out[k] = reader.read_tile(xy, mpp, px)
    return time.process_time() - cpu, time.perf_counter() - wall, out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("slide", nargs="?", help="a slide (default: the generated 40x slide)")
    p.add_argument("--scale", type=float, default=0.25, help="of the generated slide's sides")
    p.add_argument("--tiles", type=int, default=600)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mpp", type=float, default=0.5)
    p.add_argument("--tile-px", type=int, default=224)
    p.add_argument("--decoder", choices=("simplejpeg", "pillow"), default=decoder_name())
    p.add_argument("--bench-dir", default=str(Path(tempfile.gettempdir()) / "histocluster-bench"))
    a = p.parse_args(argv)
    if a.slide:
        path = Path(a.slide)
    else:
        t = time.perf_counter()
        path = make_40x_slide(a.bench_dir, scale=a.scale)
        print(f"slide {path} ({time.perf_counter() - t:.0f} s to make or find)")
    with open_slide(path) as slide:
        reader = JpegTileReader.from_slide(slide)
        print(
            f"{path.name}: {slide.dimensions[0]} x {slide.dimensions[1]} px at "
            f"{slide.mpp[0]:.4g} um/px, {slide.level_count} levels; tiles {a.tile_px} px at "
            f"{a.mpp} um/px; reduced read {reader.plan(a.mpp, a.tile_px) if reader else None}; "
            f"decoder {a.decoder}; load average {os.getloadavg()[0]:.1f}"
        )
    xys = pick_tiles(path, a.mpp, a.tile_px, a.tiles)
    print(f"{len(xys)} consecutive tissue tiles, {a.rounds} interleaved rounds")
    rates: dict[str, list[float]] = {"openslide": [], "jpeg": []}
    walls: dict[str, list[float]] = {"openslide": [], "jpeg": []}
    ratios = []
    tiles: dict[str, np.ndarray] = {}
    for r in range(a.rounds):
        order = ("openslide", "jpeg") if r % 2 == 0 else ("jpeg", "openslide")
        for kind in order:
            cpu, wall, tiles[kind] = read_all(kind, path, xys, a.mpp, a.tile_px, a.decoder)
            rates[kind].append(len(xys) / cpu)
            walls[kind].append(len(xys) / wall)
        ratios.append(rates["jpeg"][-1] / rates["openslide"][-1])
        print(
            f"  round {r + 1}: openslide {rates['openslide'][-1]:6.0f}, jpeg "
            f"{rates['jpeg'][-1]:6.0f} tiles per CPU s; ratio {ratios[-1]:.2f}"
        )
    ps = [psnr(x, y) for x, y in zip(tiles["openslide"], tiles["jpeg"], strict=True)]
    med = {k: float(np.median(v)) for k, v in rates.items()}
    wmed = {k: float(np.median(v)) for k, v in walls.items()}
    print(
        f"openslide path: {med['openslide']:.0f} tiles/s per core ({wmed['openslide']:.0f} wall)\n"
        f"jpeg reader:    {med['jpeg']:.0f} tiles/s per core ({wmed['jpeg']:.0f} wall)\n"
        f"ratio {float(np.median(ratios)):.2f}x per core (goal >= 2), "
        f"{wmed['jpeg'] / wmed['openslide']:.2f}x wall; PSNR jpeg vs openslide "
        f"min {min(ps):.1f} dB, median {float(np.median(ps)):.1f} dB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
