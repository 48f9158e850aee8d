#!/usr/bin/env python
"""Generate the synthetic H&E-like sample slide and its ground-truth region mask.

    python sample_data/make_sample_slide.py [--out-dir sample_data] [--seed 0]
                                            [--width 5376] [--height 4032]

Writes, into ``--out-dir``:

- ``sample_slide.tiff``: a pyramidal tiled TIFF (JPEG tiles of 256x256, levels by factor 2 in
  successive pages, 0.5 um/px at level 0 stored as XResolution = 20000 px/cm) that OpenSlide
  opens as ``generic-tiff``;
- ``sample_slide_mask.png``: the ground-truth region labels (uint8, see ``LABELS``) at level-0
  resolution divided by ``MASK_FACTOR``; pixel (i, j) is the label at level-0 position
  (8 j + 3.5, 8 i + 3.5), the centre of its 8x8 block;
- ``sample_slide_mask.json``: the label table, the mask factor and the generation config.

Everything is synthetic (a Beer-Lambert stain model over procedural textures), drawn from one
``numpy.random.Generator`` seeded by ``--seed``: the same seed and size give identical files.
The macro layout (tissue outline, texture blobs, artefacts) is defined on a normalised canvas,
so a small ``--width/--height`` gives the same layout in miniature (used by the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage as ndi

MASK_FACTOR = 8
"""The mask is the level-0 label image downsampled by this integer factor."""

MPP = 0.5
"""Microns per pixel at level 0."""

LABELS: dict[int, str] = {
    0: "background (glass)",
    1: "tissue: tumour-like, dense large nuclei",
    2: "tissue: loose fibrous stroma with wavy eosin streaks",
    3: "tissue: gland-like, white lumens lined by purple epithelium in pink stroma",
    4: "ink: green marker",
    5: "ink: blue marker",
    6: "fold / crease (doubled tissue)",
    7: "out-of-focus patch (blurred tumour-like tissue)",
}

# Stain optical-density vectors (Ruifrok & Johnston), RGB order.
_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)
# Marker inks as optical densities: green absorbs red and blue; blue absorbs red, then green.
_INK_GREEN = np.array([1.35, 0.30, 0.95], np.float32)
_INK_BLUE = np.array([1.50, 0.85, 0.35], np.float32)

_ASPECT = 4.0 / 3.0  # the layout canvas is [0, 4/3] x [0, 1]; any output size stretches it


@dataclass
class Config:
    """Resolved generation settings (also written to the JSON sidecar)."""

    out_dir: Path
    seed: int = 0
    width: int = 5376
    height: int = 4032
    levels: int = 4
    tile: int = 256
    quality: int = 80
    name: str = "sample_slide"
    quiet: bool = False


# ----------------------------------------------------------------------------- helpers


def _resize(a: np.ndarray, shape: tuple[int, int], resample: int = Image.BILINEAR) -> np.ndarray:
    """Resize a float32 (h, w) array to ``shape`` = (H, W) with PIL (pixel-centre aligned)."""
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.array(img.resize((shape[1], shape[0]), resample), dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> np.ndarray:
    """Smooth zero-mean, unit-std noise (H, W) with features of about ``scale_px`` pixels."""
    h = max(2, int(np.ceil(shape[0] / scale_px)) + 2)
    w = max(2, int(np.ceil(shape[1] / scale_px)) + 2)
    small = ndi.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), 0.8)
    out = _resize(small, shape, Image.BICUBIC)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def _layout_noise(rng: np.random.Generator, grid: tuple[int, int], shape: tuple[int, int]):
    """Noise on a fixed ``grid`` (independent of output size) resized to ``shape``."""
    small = ndi.gaussian_filter(rng.standard_normal(grid).astype(np.float32), 0.7)
    small = (small - small.mean()) / (small.std() + 1e-6)
    return _resize(small, shape, Image.BICUBIC)


def _points(rng: np.random.Generator, shape: tuple[int, int], density: np.ndarray | float):
    """Bernoulli point field (H, W) float32: 1 where a point falls, with per-pixel ``density``."""
    return (rng.random(shape, dtype=np.float32) < density).astype(np.float32)


def _nuclei(
    rng: np.random.Generator,
    shape: tuple[int, int],
    spacing: float,
    keep: np.ndarray | float,
    radius: np.ndarray | float,
) -> np.ndarray:
    """Soft nuclei (H, W) in [0, 1] on a jittered grid of ``spacing`` px, irregular outlines.

    A grid point is kept with probability ``keep`` (array: evaluated at half resolution) and
    drawn as a disk of ``radius`` px (array: per pixel, full resolution) around its jittered centre.
    """
    h, w = shape
    hs, ws = (h + 1) // 2, (w + 1) // 2
    step = spacing / 2
    gy, gx = np.mgrid[step / 2 : hs : step, step / 2 : ws : step]
    cy = np.clip(np.rint(gy + rng.uniform(-0.35, 0.35, gy.shape) * step), 0, hs - 1).astype(int)
    cx = np.clip(np.rint(gx + rng.uniform(-0.35, 0.35, gx.shape) * step), 0, ws - 1).astype(int)
    k = keep if np.isscalar(keep) else np.asarray(keep)[cy, cx]
    sel = rng.random(gy.shape) < k
    empty = np.ones((hs, ws), bool)
    empty[cy[sel], cx[sel]] = False
    dist = 2.0 * ndi.distance_transform_edt(empty).astype(np.float32)
    dist = _resize(dist, shape) + 1.6 * _noise(rng, shape, 4.0)
    return np.clip((radius - dist) / 1.5 + 0.5, 0.0, 1.0)


def _blobs(points: np.ndarray, sigma: float | tuple[float, float], thr: float) -> np.ndarray:
    """Soft blobs (nuclei) from a point field: Gaussian splat scaled to peak 1, soft threshold."""
    s = (sigma, sigma) if np.isscalar(sigma) else sigma
    g = ndi.gaussian_filter(points, s) * (2 * np.pi * s[0] * s[1])
    return np.clip((g - thr) / 0.25, 0.0, 1.0)


def _curve(ctrl: list[tuple[float, float]], n: int = 40) -> np.ndarray:
    """Points (n, 2) on the Bezier curve with control points ``ctrl`` (de Casteljau)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = [np.asarray(c, np.float64)[None, :].repeat(n, 0) for c in ctrl]
    while len(pts) > 1:
        pts = [(1 - t) * a + t * b for a, b in zip(pts[:-1], pts[1:], strict=True)]
    return pts[0]


def _polyline_distance(x: np.ndarray, y: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance (same shape as x) from each (x, y) to the polyline through ``pts`` (n, 2)."""
    d = np.full(x.shape, np.inf, np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1].tolist(), pts[1:].tolist(), strict=True):
        vx, vy = bx - ax, by - ay
        t = np.clip(((x - ax) * vx + (y - ay) * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
        d = np.minimum(d, np.hypot(x - (ax + t * vx), y - (ay + t * vy)))
    return d


def _ellipse(x, y, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    """Approximate signed distance (canvas units, > 0 inside) to an axis-aligned ellipse."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return ((1.0 - r) * min(rx, ry)).astype(np.float32)


def _soft(field: np.ndarray, width: float) -> np.ndarray:
    """Map a signed distance (> 0 inside) to a [0, 1] weight with a linear edge of ``width``."""
    return np.clip(field / width + 0.5, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- layout


@dataclass
class Layout:
    """Region geometry on the mask grid (h8, w8): signed distances in canvas units (> 0 inside)."""

    tissue: np.ndarray
    texture: np.ndarray  # int labels 1..3 everywhere (meaningful inside tissue)
    ink_green: np.ndarray
    ink_blue: np.ndarray
    fold: np.ndarray
    blur: np.ndarray

    def labels(self) -> np.ndarray:
        """Ground-truth label image (h8, w8) uint8, see ``LABELS``."""
        lab = np.where(self.tissue > 0, self.texture, 0).astype(np.uint8)
        lab[(self.blur > 0) & (self.tissue > 0)] = 7
        lab[(self.fold > 0) & (self.tissue > 0)] = 6
        lab[self.ink_blue > 0] = 5
        lab[self.ink_green > 0] = 4
        return lab


def make_layout(rng: np.random.Generator, shape8: tuple[int, int]) -> Layout:
    """Macro layout on the mask grid ``shape8`` = (h8, w8); only fixed-size noise is drawn here."""
    h8, w8 = shape8
    y, x = np.mgrid[0:h8, 0:w8].astype(np.float32)
    x = (x + 0.5) / w8 * _ASPECT
    y = (y + 0.5) / h8

    def lnoise(grid: tuple[int, int] = (12, 16)) -> np.ndarray:
        return _layout_noise(rng, grid, shape8)

    # Tissue: one large section and a smaller satellite piece with wobbly borders.
    wob = 0.035 * lnoise((9, 12)) + 0.012 * lnoise((24, 32)) + 0.004 * lnoise((60, 80))
    main = _ellipse(x, y, 0.63, 0.52, 0.56, 0.44) + wob
    satellite = _ellipse(x, y, 1.20, 0.66, 0.10, 0.25) + wob
    tissue = np.maximum(main, satellite)

    # Out-of-focus patch inside the tumour-like area (defined first: it forces texture 1 below it).
    blur = _ellipse(x, y, 0.38, 0.60, 0.22, 0.19) + 0.012 * lnoise()

    # Texture blobs: nearest of a few fixed seeds (label attached), boundaries perturbed by noise.
    seeds = [
        (0.33, 0.56, 1),
        (0.55, 0.30, 1),
        (0.72, 0.70, 2),
        (0.30, 0.20, 2),
        (1.20, 0.70, 2),
        (0.98, 0.36, 3),
        (0.86, 0.16, 3),
    ]
    dists = np.stack([np.hypot(x - sx, y - sy) + 0.07 * lnoise((8, 10)) for sx, sy, _ in seeds], 0)
    seed_labels = np.array([lab for _, _, lab in seeds], np.uint8)
    texture = seed_labels[np.argmin(dists, 0)]
    texture[blur > -0.04] = 1

    # Fold: a curved band across the lower right of the section.
    fold_pts = _curve([(0.58, 0.90), (0.76, 0.58), (1.08, 0.68)])
    fold = 0.095 - _polyline_distance(x, y, fold_pts) + 0.008 * lnoise((16, 20))
    texture[fold > -0.04] = 2

    # Ink strokes: thick marker bands; green along the top edge, blue down the right side.
    green_pts = _curve([(0.03, 0.20), (0.35, -0.04), (0.70, 0.18)])
    ink_green = 0.085 + 0.006 * lnoise((20, 26)) - _polyline_distance(x, y, green_pts)
    blue_pts = _curve([(1.30, 0.04), (1.08, 0.45), (1.27, 0.97)])
    ink_blue = 0.080 + 0.006 * lnoise((20, 26)) - _polyline_distance(x, y, blue_pts)
    return Layout(tissue, texture, ink_green, ink_blue, fold, blur)


# ----------------------------------------------------------------------------- textures


def _half(shape: tuple[int, int]) -> tuple[int, int]:
    return (shape[0] + 1) // 2, (shape[1] + 1) // 2


def _tumour(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin densities (H, W) of sheets of large crowded atypical nuclei."""
    keep = np.clip(0.75 + 0.25 * _noise(rng, _half(shape), 90.0), 0.3, 1.0)
    radius = 7.0 + 1.6 * _noise(rng, shape, 10.0)
    nuclei = _nuclei(rng, shape, 21.0, keep, radius)
    grain = ndi.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 1.0) * 2.0
    chromatin = 0.85 + 0.15 * np.clip(grain, -2.0, 2.0)
    hema = 0.10 + 1.05 * nuclei * chromatin
    eosin = 0.38 + 0.10 * _noise(rng, shape, 25.0) - 0.15 * nuclei
    return hema, eosin


def _stroma(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Densities (H, W) of loose stroma: wavy eosin fibres, clefts, sparse spindle nuclei.

    Drawn at half resolution (the fibres are smooth) and upsampled.
    """
    hs, ws = half = _half(shape)
    fib = ndi.gaussian_filter(rng.standard_normal(half, dtype=np.float32), (0.8, 7.0))
    fib /= fib.std() + 1e-6
    # Wavy fibres: shift every pixel vertically by a smooth offset field.
    off = 9.0 * _noise(rng, half, 150.0) + 3.0 * _noise(rng, half, 30.0)
    frac = off - np.floor(off)
    rows = (np.arange(hs, dtype=np.int32)[:, None] + np.floor(off).astype(np.int32)) % hs
    fib = (1 - frac) * np.take_along_axis(fib, rows, 0) + frac * np.take_along_axis(
        fib, (rows + 1) % hs, 0
    )
    fibres = 1.0 / (1.0 + np.exp(-2.2 * (fib - 0.1)))
    clefts = np.clip(0.9 + 0.5 * _noise(rng, half, 45.0), 0.15, 1.0)
    spindles = _blobs(_points(rng, half, 1 / 650.0), (0.8, 2.75), 0.4)
    spindles = np.take_along_axis(spindles, rows, 0)
    eosin = (0.12 + 0.90 * fibres) * clefts + 0.05 * _noise(rng, half, 3.0).clip(-1, 1)
    hema = 0.03 + 0.95 * spindles
    return _resize(hema, shape), _resize(eosin, shape)


def _glands(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Densities (H, W) of gland-like tissue: white lumens lined by a purple epithelium of small
    nuclei, in pink stroma. Drawn at half resolution (1 px = 1 um) and upsampled."""
    hs, ws = half = _half(shape)
    step = 62  # half-res px (= um) between gland centres
    gy, gx = np.mgrid[step / 2 : hs : step, step / 2 : ws : step]
    cy = np.clip(np.rint(gy + rng.uniform(-0.32, 0.32, gy.shape) * step), 0, hs - 1).astype(int)
    cx = np.clip(np.rint(gx + rng.uniform(-0.32, 0.32, gx.shape) * step), 0, ws - 1).astype(int)
    empty = np.ones(half, bool)
    empty[cy, cx] = False
    d = ndi.distance_transform_edt(empty).astype(np.float32)
    d += 2.5 * _noise(rng, half, 10.0)  # irregular outlines
    r_lumen = 12.0 + 3.5 * _noise(rng, half, 50.0)
    lumen = np.clip((r_lumen - d) / 1.5 + 0.5, 0.0, 1.0)
    ring = np.clip((r_lumen + 9.0 - d) / 1.5 + 0.5, 0.0, 1.0) - lumen
    nuclei = _nuclei(rng, half, 8.0, 0.9, 2.6 + 0.5 * _noise(rng, half, 6.0)) * ring
    eosin = (0.42 + 0.08 * _noise(rng, half, 8.0)) * (1.0 - lumen) - 0.12 * ring + 0.03
    hema = 0.04 + 0.22 * ring + 0.95 * nuclei
    return _resize(hema, shape), _resize(eosin, shape)


# ----------------------------------------------------------------------------- rendering


def _box8(mask8: np.ndarray, pad: int) -> tuple[slice, slice] | None:
    """Bounding box (rows, cols) of ``mask8`` on the mask grid, padded by ``pad`` cells."""
    rows = np.flatnonzero(mask8.any(1))
    cols = np.flatnonzero(mask8.any(0))
    if rows.size == 0:
        return None
    h, w = mask8.shape
    return (
        slice(max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)),
        slice(max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)),
    )


def _full(box: tuple[slice, slice]) -> tuple[slice, slice]:
    """The level-0 slices covered by a mask-grid box."""
    f = MASK_FACTOR
    return slice(f * box[0].start, f * box[0].stop), slice(f * box[1].start, f * box[1].stop)


def _up(field8: np.ndarray, box: tuple[slice, slice]) -> np.ndarray:
    """Bilinear upsampling of a mask-grid field inside ``box`` to level 0 (grid-aligned)."""
    sub = field8[box]
    return _resize(sub, (sub.shape[0] * MASK_FACTOR, sub.shape[1] * MASK_FACTOR))


def render(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 RGB image (H, W, 3) uint8 and the label mask (H/8, W/8) uint8."""
    rng = np.random.default_rng(cfg.seed)
    shape = (cfg.height, cfg.width)
    shape8 = (cfg.height // MASK_FACTOR, cfg.width // MASK_FACTOR)
    lay = make_layout(rng, shape8)
    labels = lay.labels()
    px = 1.0 / cfg.height  # one level-0 pixel in canvas units
    near = 12 * MASK_FACTOR * px  # a margin of 12 mask cells, in canvas units

    # Glass, then each texture added inside its own bounding box (Beer-Lambert: densities add).
    od = np.empty(shape + (3,), np.float32)
    od[:] = (0.025 + 0.003 * _noise(rng, shape, 120.0))[..., None]
    for lab, fn in ((1, _tumour), (2, _stroma), (3, _glands)):
        onehot = (lay.texture == lab).astype(np.float32)
        box = _box8((onehot > 0) & (lay.tissue > -near), 2)
        if box is None:
            continue
        weight = _up(ndi.gaussian_filter(onehot, 0.8), box)
        weight *= _soft(_up(lay.tissue, box), 6 * px)
        hema, eosin = fn(rng, weight.shape)
        hema = weight * np.clip(hema, 0.0, None)
        eosin = weight * np.clip(eosin, 0.0, None)
        sub = od[_full(box)]
        for c in range(3):
            sub[..., c] += hema * _HEMATOXYLIN[c] + eosin * _EOSIN[c]
        del weight, hema, eosin, sub

    # Fold: the tissue is doubled over itself, so its optical density adds to a shifted copy.
    box = _box8(lay.fold > -near, 8)  # 8 cells = 64 px > the shift, so np.roll wraps harmlessly
    if box is not None:
        fold8 = _up(lay.fold, box)
        f = (_soft(fold8, 10 * px) * _soft(_up(lay.tissue, box), 6 * px))[..., None]
        crease = 0.35 * np.exp(-((fold8 / (5 * px)) ** 2))[..., None]
        sub = od[_full(box)]
        shifted = np.roll(sub, (41, -29), (0, 1))
        extra = 0.22 * _EOSIN + 0.10 * _HEMATOXYLIN  # mounting compresses the doubled layer
        sub += f * (0.95 * shifted + extra + crease * _HEMATOXYLIN)
        del fold8, f, crease, sub, shifted

    # Out-of-focus patch: strong Gaussian blur of the optical density, feathered edge.
    box = _box8(lay.blur > -near, 6)
    if box is not None:
        b = (_soft(_up(lay.blur, box), 30 * px) * _soft(_up(lay.tissue, box), 6 * px))[..., None]
        sub = od[_full(box)]
        blurred = ndi.gaussian_filter(sub, (7.0, 7.0, 0.0))
        sub += b * (blurred - sub)
        del b, sub, blurred

    # Marker ink: a light filter on top of everything, mottled, with darker pooled rims.
    for field, vec in ((lay.ink_green, _INK_GREEN), (lay.ink_blue, _INK_BLUE)):
        box = _box8(field > -near, 2)
        if box is None:
            continue
        f_up = _up(field, box)
        shp = f_up.shape
        dens = 0.85 + 0.05 * _noise(rng, shp, 12.0) + 0.06 * _noise(rng, shp, 250.0)
        dens += 0.05 * _noise(rng, shp, 40.0)
        dens += 0.35 * np.exp(-((f_up / (12 * px)) ** 2))  # pooled ink at the edges
        dens *= _soft(f_up, 8 * px)
        od[_full(box)] += dens[..., None] * vec
        del f_up, dens

    rgb = 255.0 * np.exp(-od)
    del od
    rgb += 1.6 * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8), labels


def pyramid(level0: np.ndarray, levels: int) -> list[np.ndarray]:
    """Levels by factor 2 (2x2 box mean), finest first; (H, W, 3) uint8 each."""
    out = [level0]
    for _ in range(levels - 1):
        a = out[-1]
        h, w = a.shape[0] // 2 * 2, a.shape[1] // 2 * 2
        s = a[:h:2, :w:2].astype(np.uint16) + a[1:h:2, :w:2] + a[:h:2, 1:w:2] + a[1:h:2, 1:w:2]
        out.append(((s + 2) // 4).astype(np.uint8))
    return out


def write_tiff(path: Path, levels: list[np.ndarray], cfg: Config) -> None:
    """Pyramidal tiled JPEG TIFF, one page per level, resolution in px/cm (OpenSlide generic-tiff)."""
    ppcm = 1e4 / MPP
    desc = f"histocluster synthetic H&E-like sample slide; seed={cfg.seed}; mpp={MPP}"
    with tifffile.TiffWriter(path) as tw:
        for k, img in enumerate(levels):
            tw.write(
                img,
                photometric="rgb",
                tile=(cfg.tile, cfg.tile),
                compression="jpeg",
                compressionargs={"level": cfg.quality},
                subfiletype=0 if k == 0 else 1,
                resolution=(ppcm / 2**k, ppcm / 2**k),
                resolutionunit="CENTIMETER",
                description=desc if k == 0 else None,
                software="histocluster sample_data/make_sample_slide.py",
                metadata=None,
            )


def write_mask(png: Path, sidecar: Path, labels: np.ndarray, cfg: Config) -> None:
    """Label PNG (with the label table in its text chunks) and the JSON sidecar."""
    meta = {
        "description": "ground-truth region labels of the synthetic sample slide",
        "slide": f"{cfg.name}.tiff",
        "mask_factor": MASK_FACTOR,
        "mask_shape_hw": list(labels.shape),
        "level0_size_wh": [cfg.width, cfg.height],
        "mpp_level0": MPP,
        "pixel_centre": "mask[i, j] is the label at level-0 (x, y) = (8*j + 3.5, 8*i + 3.5)",
        "labels": {str(k): v for k, v in LABELS.items()},
        "label_pixels": {str(k): int((labels == k).sum()) for k in LABELS},
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "quiet")},
    }
    info = PngInfo()
    info.add_text("histocluster_labels", json.dumps(meta["labels"]))
    info.add_text("mask_factor", str(MASK_FACTOR))
    Image.fromarray(labels, mode="L").save(png, pnginfo=info, optimize=True)
    sidecar.write_text(json.dumps(meta, indent=2) + "\n")


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    """argparse with the project's one-line error format instead of usage + message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} — see --help", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv: list[str] | None = None) -> Config:
    """Build the ``Config`` from the command line."""
    p = _Parser(
        description="Generate the synthetic H&E-like sample slide (pyramidal JPEG TIFF, 0.5 um/px) "
        "and its ground-truth region mask.",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="folder for sample_slide.tiff, sample_slide_mask.png and sample_slide_mask.json "
        "(default: the folder of this script)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of numpy's Generator (default 0)")
    p.add_argument(
        "--width",
        type=int,
        default=Config.width,
        help=f"level-0 width in pixels, a multiple of {MASK_FACTOR} (default {Config.width})",
    )
    p.add_argument(
        "--height",
        type=int,
        default=Config.height,
        help=f"level-0 height in pixels, a multiple of {MASK_FACTOR} (default {Config.height})",
    )
    p.add_argument("--levels", type=int, default=Config.levels, help="pyramid levels (default 4)")
    p.add_argument("--tile", type=int, default=Config.tile, help="TIFF tile side (default 256)")
    p.add_argument("--quality", type=int, default=Config.quality, help="JPEG quality (default 80)")
    p.add_argument("--name", default=Config.name, help="file stem (default sample_slide)")
    p.add_argument("--quiet", action="store_true", help="print nothing on success")
    a = p.parse_args(argv)
    problems = []
    for flag, v in (("--width", a.width), ("--height", a.height)):
        if v < 64 or v % MASK_FACTOR:
            problems.append(f"{flag}: {v} is not a multiple of {MASK_FACTOR} >= 64")
    if not 1 <= a.levels <= 8:
        problems.append(f"--levels: {a.levels} is not in 1..8")
    if a.tile < 16 or a.tile % 16:
        problems.append(f"--tile: {a.tile} is not a multiple of 16")
    if not 1 <= a.quality <= 100:
        problems.append(f"--quality: {a.quality} is not in 1..100")
    if problems:
        print(f"error: {problems[0]} — pass a valid value (see --help)", file=sys.stderr)
        raise SystemExit(2)
    return Config(
        a.out_dir, a.seed, a.width, a.height, a.levels, a.tile, a.quality, a.name, a.quiet
    )


def main(argv: list[str] | None = None) -> int:
    """Generate the slide, the mask and the sidecar; return the exit status."""
    cfg = parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(
            f"error: {cfg.out_dir}: cannot create folder ({e.strerror}) — pick another --out-dir",
            file=sys.stderr,
        )
        return 1
    level0, labels = render(cfg)
    tiff = cfg.out_dir / f"{cfg.name}.tiff"
    try:
        write_tiff(tiff, pyramid(level0, cfg.levels), cfg)
        write_mask(
            cfg.out_dir / f"{cfg.name}_mask.png", cfg.out_dir / f"{cfg.name}_mask.json", labels, cfg
        )
    except OSError as e:
        print(
            f"error: {cfg.out_dir}: cannot write ({e.strerror}) — check the folder is writable",
            file=sys.stderr,
        )
        return 1
    if not cfg.quiet:
        size = tiff.stat().st_size / 1e6
        print(
            f"wrote {tiff} ({cfg.width}x{cfg.height}, {cfg.levels} levels, {size:.1f} MB) "
            f"and its mask in {time.perf_counter() - t0:.1f} s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
