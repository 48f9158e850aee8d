#!/usr/bin/env python
"""Write a real-sized 40x benchmark slide from the real CMU slide's pixels.

    .venv/bin/python benchmarks/make_40x_slide.py OUT_DIR [--scale 1.0] [--tile 256]
                                                  [--quality 70] [--photometric ycbcr]

The slide is ``CMU-1-Small-Region.svs`` (2220 x 2967 px of real H&E) repeated 40 x 24 times
with mirrored repeats (every other copy flipped, so neighbours meet edge to edge), giving
88,800 x 71,208 px at level 0, declared 0.25 um/px (a 40x scan) in the TIFF resolution tags
(40,000 px/cm) and in the ImageDescription (``MPP = 0.25``). ``--scale`` shrinks both sides
(the same repeats, cut short) for quick runs and tests, or grows them (more repeats; 2 gives
4x the area). Levels: /1 /4 /16 /64 in successive
pages (``subfiletype`` 1 for the reduced ones), JPEG tiles of ``--tile`` px, so OpenSlide
opens it as ``generic-tiff`` and ``engine.slide.open_slide`` reads mpp 0.25.

Each reduced level samples the source shrunk (antialiased) by its factor, at the mirrored
source position of each level pixel's level-0 centre: the levels line up with level 0 (no drift
across repeats), as a scanner's pyramid does. Tiles are made and written one at a time from a
generator, so peak memory is the source image plus a few tiles, whatever the slide's size. The
output is a function of the arguments only (same arguments, same bytes); an existing file of
the same name is reused (``--force`` rewrites it). The file name carries the arguments.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
REPEATS = (40, 24)
"""Copies of the source across and down: 40 x 2220 = 88,800 and 24 x 2967 = 71,208 px."""
MPP = 0.25
DOWNSAMPLES = (1, 4, 16, 64)


def slide_name(scale: float, tile: int, quality: int, photometric: str) -> str:
    """The file name for these arguments (so differently made slides never collide)."""
    return f"cmu40x_s{scale:g}_t{tile}_q{quality}_{photometric}.tiff"


def _source_rgb(source: Path) -> np.ndarray:
    """Level 0 of the source slide as OpenSlide shows it: (H, W, 3) uint8."""
    sys.path.insert(0, str(REPO))
    from engine.slide import open_slide

    with open_slide(source) as slide:
        w, h = slide.dimensions
        return slide.read_region((0, 0), 0, (w, h))


def _mirror(x: np.ndarray, n: int) -> np.ndarray:
    """Index into a length-``n`` axis of the mirrored tiling at positions ``x`` (int64)."""
    r = np.mod(x, 2 * n)
    return np.where(r < n, r, 2 * n - 1 - r)


def _level_tiles(
    src: np.ndarray, src_full: tuple[int, int], dims: tuple[int, int], ds: int, tile: int
) -> Iterator[np.ndarray]:
    """The (tile, tile, 3) tiles of one level, row by row; past the level's edge is white.

    ``src`` is the source shrunk by ``ds`` (or the source itself); ``src_full`` = (w, h) of the
    unshrunk source, whose mirrored tiling defines level 0.
    """
    W, H = dims
    sw, sh = src.shape[1], src.shape[0]
    fw, fh = src_full

    def index(n_px: int, n_full: int, n_src: int) -> np.ndarray:
        l0 = np.floor((np.arange(n_px, dtype=np.float64) + 0.5) * ds).astype(np.int64)
        m = _mirror(l0, n_full)
        return np.minimum((m * n_src) // n_full, n_src - 1)

    xi, yi = index(W, fw, sw), index(H, fh, sh)
    for y0 in range(0, H, tile):
        rows = yi[y0 : y0 + tile]
        for x0 in range(0, W, tile):
            cols = xi[x0 : x0 + tile]
            out = np.full((tile, tile, 3), 255, np.uint8)
            out[: len(rows), : len(cols)] = src[rows[:, None], cols[None, :]]
            yield out


def make_40x_slide(
    out_dir: str | Path,
    scale: float = 1.0,
    tile: int = 256,
    quality: int = 70,
    photometric: str = "ycbcr",
    source: str | Path = CMU,
    force: bool = False,
) -> Path:
    """Write (or reuse) the benchmark slide in ``out_dir``; returns its path.

    ``photometric``: "ycbcr" (JPEG in YCbCr with 2x2 chroma subsampling, as most scanners and
    converters write) or "rgb" (JPEG storing RGB, as Aperio does).
    """
    if not scale > 0:
        raise ValueError(f"--scale must be positive, got {scale}")
    if tile % 16:
        raise ValueError(f"--tile must be a multiple of 16, got {tile}")
    out = Path(out_dir) / slide_name(scale, tile, quality, photometric)
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    full = _source_rgb(Path(source))
    fh, fw = full.shape[:2]
    W0 = max(1, round(REPEATS[0] * fw * scale))
    H0 = max(1, round(REPEATS[1] * fh * scale))
    px_per_cm = 1e4 / MPP
    description = (
        f"histocluster 40x benchmark slide: {Path(source).name} mirrored {REPEATS[0]}x"
        f"{REPEATS[1]} (scale {scale:g}), {W0}x{H0} px, tiles {tile} px, JPEG Q={quality} "
        f"{photometric.upper()}|MPP = {MPP}"
    )
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            for level, ds in enumerate(DOWNSAMPLES):
                dims = (max(1, math.ceil(W0 / ds)), max(1, math.ceil(H0 / ds)))
                if ds == 1:
                    src = full
                else:
                    size = (max(1, round(fw / ds)), max(1, round(fh / ds)))
                    src = np.asarray(Image.fromarray(full).resize(size, Image.Resampling.BILINEAR))
                tif.write(
                    _level_tiles(src, (fw, fh), dims, ds, tile),
                    shape=(dims[1], dims[0], 3),
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric="rgb",
                    compression="jpeg",
                    compressionargs={
                        "level": quality,
                        "outcolorspace": "ycbcr" if photometric == "ycbcr" else "rgb",
                    },
                    subsampling=(2, 2) if photometric == "ycbcr" else (1, 1),
                    resolution=(px_per_cm / ds, px_per_cm / ds),
                    resolutionunit="CENTIMETER",
                    subfiletype=0 if level == 0 else 1,
                    description=description if level == 0 else None,
                    metadata=None,
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("out_dir")
    p.add_argument(
        "--scale", type=float, default=1.0, help="factor of each side (default 1; 2 = 4x the area)"
    )
    p.add_argument("--tile", type=int, default=256, help="JPEG tile size in px (256 or 240)")
    p.add_argument("--quality", type=int, default=70, help="JPEG quality (default 70)")
    p.add_argument("--photometric", choices=("ycbcr", "rgb"), default="ycbcr")
    p.add_argument("--source", default=str(CMU))
    p.add_argument("--force", action="store_true", help="rewrite an existing file")
    a = p.parse_args(argv)
    t = time.perf_counter()
    try:
        path = make_40x_slide(
            a.out_dir, a.scale, a.tile, a.quality, a.photometric, a.source, a.force
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
