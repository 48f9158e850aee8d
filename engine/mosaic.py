"""Pictures of a clustering: the cluster palette, the exemplar mosaic and the label overlay.

``cluster_colors`` is the one palette used everywhere a cluster has a colour (overlay PNGs,
GeoJSON classifications, the napari layer), so cluster 3 looks the same in all of them.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# matplotlib's tab10 then the light half of tab20: distinct, colour-blind-friendlier than HSV.
_BASE = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
]  # fmt: skip


def cluster_colors(k: int) -> np.ndarray:
    """(k, 3) uint8 RGB colour of each cluster: tab10 + tab20-light, then golden-ratio hues."""
    out = list(_BASE[:k])
    i = 0
    while len(out) < k:
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 if i % 2 else 0.9, 0.85 if i % 3 else 0.65)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
        i += 1
    return np.asarray(out, dtype=np.uint8).reshape(k, 3)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def exemplar_mosaic(
    tiles: Sequence[Sequence[np.ndarray]],
    colors: np.ndarray,
    counts: Sequence[int] | None = None,
    cell_px: int = 128,
    gap_px: int = 4,
) -> np.ndarray:
    """One row per cluster: a label with its colour and tile count, then its exemplar tiles.

    Args:
        tiles: per cluster, a list of (h, w, 3) uint8 tiles (may be empty).
        colors: (k, 3) uint8 cluster colours.
        counts: tiles per cluster, printed under the label.
        cell_px: side of each tile in the mosaic (tiles are resized).
    Returns:
        (H, W, 3) uint8 RGB image.
    """
    k = len(tiles)
    per_row = max([len(t) for t in tiles] + [1])
    label_w = max(96, cell_px)
    width = label_w + per_row * (cell_px + gap_px) + gap_px
    height = max(k, 1) * (cell_px + gap_px) + gap_px
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(max(12, cell_px // 8))
    for c in range(k):
        y = gap_px + c * (cell_px + gap_px)
        color = tuple(int(v) for v in colors[c])
        draw.rectangle([gap_px, y, gap_px + 16, y + cell_px - 1], fill=color)
        text = f"cluster {c}" + (f"\n{counts[c]} tiles" if counts is not None else "")
        draw.multiline_text((gap_px + 24, y + 4), text, fill=(0, 0, 0), font=font)
        for j, tile in enumerate(tiles[c]):
            x = label_w + gap_px + j * (cell_px + gap_px)
            cell = Image.fromarray(np.asarray(tile, dtype=np.uint8)).resize(
                (cell_px, cell_px), Image.Resampling.BILINEAR
            )
            img.paste(cell, (x, y))
            draw.rectangle(
                [x, y, x + cell_px - 1, y + cell_px - 1], outline=color, width=max(2, cell_px // 40)
            )
    return np.asarray(img)


def grid_to_pixels(
    labels: np.ndarray,
    stride_l0_xy: Sequence[float],
    l0_dimensions: Sequence[int],
    out_wh: Sequence[int],
) -> np.ndarray:
    """Tile labels painted at image scale: each pixel takes the label of the grid cell it falls in.

    Args:
        labels: (rows, cols) integer labels of a tile grid with step ``stride_l0_xy`` level-0 px.
        l0_dimensions: level-0 (W, H) the image of size ``out_wh`` = (w, h) covers.
    Returns:
        (h, w) array of ``labels``' dtype (-1 where a pixel falls outside the grid).
    """
    rows, cols = labels.shape
    w, h = int(out_wh[0]), int(out_wh[1])
    xs = (np.arange(w) + 0.5) * (l0_dimensions[0] / w)
    ys = (np.arange(h) + 0.5) * (l0_dimensions[1] / h)
    ci = np.floor(xs / stride_l0_xy[0]).astype(np.int64)
    ri = np.floor(ys / stride_l0_xy[1]).astype(np.int64)
    out = np.full((h, w), -1, dtype=labels.dtype)
    cv, rv = ci < cols, ri < rows
    out[np.ix_(rv, cv)] = labels[np.ix_(ri[rv], ci[cv])]
    return out


def label_overlay(
    thumbnail: np.ndarray,
    labels: np.ndarray,
    stride_l0_xy: Sequence[float],
    l0_dimensions: Sequence[int],
    colors: np.ndarray,
    alpha: float = 0.45,
    legend: bool = True,
) -> np.ndarray:
    """The thumbnail with each tissue tile tinted by its cluster colour (labels -1 untouched).

    Args:
        thumbnail: (h, w, 3) uint8 of the whole slide.
        labels: (rows, cols) cluster labels, -1 outside tissue.
        colors: (k, 3) uint8 palette.
    Returns:
        (h, w', 3) uint8: the overlay, with a legend strip on the right when ``legend``.
    """
    h, w = thumbnail.shape[:2]
    px = grid_to_pixels(np.asarray(labels), stride_l0_xy, l0_dimensions, (w, h))
    out = thumbnail.astype(np.float32).copy()
    inside = px >= 0
    tint = colors[np.clip(px, 0, len(colors) - 1)].astype(np.float32)
    out[inside] = (1 - alpha) * out[inside] + alpha * tint[inside]
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if not legend:
        return out
    k = len(colors)
    row_h = 18
    strip = Image.new("RGB", (110, max(h, k * row_h + 8)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    font = _font(12)
    present = np.unique(np.asarray(labels)[np.asarray(labels) >= 0])
    for i, c in enumerate(present):
        y = 4 + i * row_h
        draw.rectangle([6, y, 20, y + 12], fill=tuple(int(v) for v in colors[c]))
        draw.text((26, y - 1), f"cluster {c}", fill=(0, 0, 0), font=font)
    canvas = Image.new("RGB", (w + strip.width, max(h, strip.height)), (255, 255, 255))
    canvas.paste(Image.fromarray(out), (0, 0))
    canvas.paste(strip, (w, 0))
    return np.asarray(canvas)
