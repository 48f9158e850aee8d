"""Foreground (tissue) masks of RGB images, computed at thumbnail scale.

Two methods:

- ``otsu`` (default): Otsu's threshold on HSV saturation. White background and glass have
  almost no saturation; stained tissue, ink and folds have a lot.
- ``hsv``: the rule of Ciga, Xu and Martel, Appendix A: ``0.5 < hue < 0.65``,
  ``saturation > 0.1``, ``0.5 < value < 0.9`` (all in [0, 1]), bounds as parameters.

On real H&E (``shared/data/tissue-tiles``) the paper's literal hue band 0.5-0.65 (cyan to
blue) selects almost none of the stained tissue, whose hue lies around 0.75-0.95 (purple to
pink); the bounds probably assumed another channel order or hue convention. The rule is kept
selectable with its bounds as parameters, and Otsu on saturation is the default because it
separates tissue from background on those tiles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
from PIL import Image

TissueMethod = Literal["otsu", "hsv"]
TISSUE_METHODS: tuple[str, ...] = ("otsu", "hsv")

# Otsu's saturation threshold (0-255) is clipped to this range: the floor keeps an all-white
# slide from being split into "tissue" and "background" by its noise; the ceiling keeps a field
# that is nearly all tissue from being split into "dark tissue" and "pale tissue".
MIN_SATURATION = 20
MAX_SATURATION = 40


def _hsv(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8 HSV (each channel 0-255)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("HSV"))


def hsv_foreground(
    rgb: np.ndarray,
    hue: tuple[float, float] = (0.5, 0.65),
    min_saturation: float = 0.1,
    value: tuple[float, float] = (0.5, 0.9),
) -> np.ndarray:
    """The paper's Appendix A rule. (H, W, 3) uint8 RGB -> (H, W) bool foreground.

    Bounds are fractions in [0, 1]: ``hue[0] < h < hue[1]``, ``s > min_saturation``,
    ``value[0] < v < value[1]``.
    """
    hsv = _hsv(rgb).astype(np.float32) / 255.0
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    return (h > hue[0]) & (h < hue[1]) & (s > min_saturation) & (v > value[0]) & (v < value[1])


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 ``values``: the level maximising between-class variance."""
    return otsu_threshold_of_histogram(np.bincount(values.ravel(), minlength=256))


def otsu_threshold_of_histogram(counts: np.ndarray) -> int:
    """Otsu's threshold of the uint8 values whose (256,) histogram is ``counts``."""
    hist = np.asarray(counts, dtype=np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    weight_bg = np.cumsum(hist)
    weight_fg = total - weight_bg
    mean_cum = np.cumsum(hist * levels)
    mean_bg = mean_cum / np.maximum(weight_bg, 1)
    mean_fg = (mean_cum[-1] - mean_cum) / np.maximum(weight_fg, 1)
    between = weight_bg * weight_fg * (mean_bg - mean_fg) ** 2
    return int(np.argmax(between))


def otsu_foreground(
    rgb: np.ndarray, min_saturation: int = MIN_SATURATION, max_saturation: int = MAX_SATURATION
) -> np.ndarray:
    """Otsu on saturation, threshold clipped to [min, max]. (H, W, 3) uint8 RGB -> (H, W) bool."""
    sat = _hsv(rgb)[..., 1]
    threshold = int(np.clip(otsu_threshold(sat), min_saturation, max_saturation))
    return sat > threshold


def tissue_mask(
    rgb: np.ndarray, method: TissueMethod = "otsu", clean: bool = True, **bounds: object
) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) bool tissue mask by ``method`` ("otsu" or "hsv").

    ``clean`` fills pinholes and the gaps between fibres (3x3 closing); it does not open, which
    would erase thin strands of tissue.
    ``bounds`` go to the method (e.g. ``hue=(0.5, 0.65)`` for "hsv").
    """
    if method == "otsu":
        mask = otsu_foreground(rgb, **bounds)  # type: ignore[arg-type]
    elif method == "hsv":
        mask = hsv_foreground(rgb, **bounds)  # type: ignore[arg-type]
    else:
        raise ValueError(
            f"unknown tissue method {method!r}; choose one of {', '.join(TISSUE_METHODS)}"
        )
    if clean and min(mask.shape) >= 3:
        mask = _closed(mask, 0, len(mask)) | mask
    return mask


def _closed(rows: np.ndarray, top: int, stop: int) -> np.ndarray:
    """Binary closing (cross-shaped 3x3, outside the image = 0) of ``rows``, which hold
    ``CLOSE_OVERLAP`` rows of context above and below the rows wanted (fewer at the image's
    edges: ``top`` rows above, up to ``stop``). Rows [top, stop) of the result are those of the
    whole image's closing: each closed row depends on the 2 mask rows either side only."""
    from scipy import ndimage  # ~0.3 s to import: only once a mask is cleaned (extraction
    # then loads its encoder in another thread, so the import overlaps it)

    return ndimage.binary_closing(rows, border_value=0)[top:stop]


CLOSE_OVERLAP = 2
"""Rows of context a strip's closing needs on each side (dilation then erosion, 1 row each)."""


def tissue_mask_of_strips(
    strips: Iterable[np.ndarray],
    method: TissueMethod = "otsu",
    clean: bool = True,
    **bounds: object,
) -> np.ndarray:
    """``tissue_mask`` of an image given top to bottom as RGB strips; the same (H, W) bool mask.

    Holds 2 bytes per pixel (the saturation or raw mask of each strip, and the result) instead
    of the whole image and its HSV and float copies: Otsu's threshold comes from the histogram
    summed over the strips, and the cleaning is done strip by strip with ``CLOSE_OVERLAP`` rows
    of context.

    Args:
        strips: (h_i, W, 3) uint8 RGB strips, top to bottom.
    """
    if method not in TISSUE_METHODS:
        raise ValueError(
            f"unknown tissue method {method!r}; choose one of {', '.join(TISSUE_METHODS)}"
        )
    planes: list[np.ndarray] = []  # per strip: saturation (otsu) or raw mask (hsv)
    counts = np.zeros(256, np.int64)
    for strip in strips:
        if method == "otsu":
            sat = _hsv(strip)[..., 1]
            counts += np.bincount(sat.ravel(), minlength=256)
            planes.append(sat)
        else:
            planes.append(hsv_foreground(strip, **bounds))  # type: ignore[arg-type]
    starts = np.cumsum([0] + [len(q) for q in planes])
    h, w = int(starts[-1]), (planes[0].shape[1] if planes else 0)
    threshold = 0
    if method == "otsu":
        lo = int(bounds.get("min_saturation", MIN_SATURATION))  # type: ignore[call-overload]
        hi = int(bounds.get("max_saturation", MAX_SATURATION))  # type: ignore[call-overload]
        threshold = int(np.clip(otsu_threshold_of_histogram(counts), lo, hi))

    def raw(a: int, b: int) -> np.ndarray:
        """Raw mask rows [a, b) of the whole image."""
        i, j = np.searchsorted(starts, a, "right") - 1, np.searchsorted(starts, b, "left")
        parts = [q[max(a - s0, 0) : b - s0] for q, s0 in zip(planes[i:j], starts[i:j], strict=True)]
        rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return rows > threshold if method == "otsu" else rows

    out = np.empty((h, w), bool)
    cleaning = clean and min(h, w) >= 3
    step = max(64, (1 << 22) // max(1, w))  # about 4 MiB of mask per strip
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        if not cleaning:
            out[r0:r1] = raw(r0, r1)
            continue
        a, b = max(0, r0 - CLOSE_OVERLAP), min(h, r1 + CLOSE_OVERLAP)
        rows = raw(a, b)
        out[r0:r1] = _closed(rows, r0 - a, r1 - a) | rows[r0 - a : r1 - a]
        while len(planes) > 1 and starts[1] <= max(0, r1 - CLOSE_OVERLAP):  # done with it
            planes.pop(0)
            starts = starts[1:]
    return out


def tissue_fraction(rgb: np.ndarray, method: TissueMethod = "otsu", **bounds: object) -> float:
    """Share of foreground pixels in an RGB image, in [0, 1]."""
    return float(tissue_mask(rgb, method, clean=False, **bounds).mean())
