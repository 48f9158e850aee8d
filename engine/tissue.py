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
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
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
        from scipy import ndimage  # ~0.3 s to import: only once a mask is cleaned (extraction
        # then loads its encoder in another thread, so the import overlaps it)

        mask = ndimage.binary_closing(mask, border_value=0) | mask
    return mask


def tissue_fraction(rgb: np.ndarray, method: TissueMethod = "otsu", **bounds: object) -> float:
    """Share of foreground pixels in an RGB image, in [0, 1]."""
    return float(tissue_mask(rgb, method, clean=False, **bounds).mean())
