"""Tissue detection on real H&E tiles: six mostly-tissue, two almost-white."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.tissue import hsv_foreground, otsu_threshold, tissue_fraction, tissue_mask


def _tiles(shared_data: Path, prefix: str) -> list[np.ndarray]:
    paths = sorted((shared_data / "tissue-tiles").glob(f"{prefix}*.png"))
    assert paths, f"no {prefix}* tiles"
    # Thumbnail scale: the masks are computed on downsampled images.
    return [
        np.asarray(Image.open(p).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
        for p in paths
    ]


def test_otsu_separates_tissue_from_background(shared_data: Path) -> None:
    tissue = [tissue_fraction(t, "otsu") for t in _tiles(shared_data, "tissue-")]
    white = [tissue_fraction(t, "otsu") for t in _tiles(shared_data, "almost-white-")]
    assert len(tissue) == 6 and len(white) == 2
    assert min(tissue) > 0.35
    assert max(white) < 0.05
    masks = [tissue_mask(t, "otsu").mean() for t in _tiles(shared_data, "tissue-")]
    assert min(masks) >= min(tissue)  # cleaning fills gaps, never removes tissue


def test_paper_literal_hsv_bounds_miss_real_he(shared_data: Path) -> None:
    """The paper's hue band (0.5-0.65, cyan-blue) does not contain H&E's purple-pink."""
    tissue = [tissue_fraction(t, "hsv") for t in _tiles(shared_data, "tissue-")]
    assert max(tissue) < 0.05
    # With a hue band where H&E lies, the same rule finds the tissue: the bounds are parameters.
    tuned = [
        hsv_foreground(t, hue=(0.7, 0.98), min_saturation=0.1, value=(0.3, 0.95)).mean()
        for t in _tiles(shared_data, "tissue-")
    ]
    assert min(tuned) > 0.3


def test_hsv_rule_bounds_on_synthetic_colours() -> None:
    # hue 0.58 (blue-cyan), s 0.5, v 0.7 lies inside the paper's box; pure white and red do not
    rgb = np.array([[[89, 136, 179], [255, 255, 255], [200, 30, 30]]], dtype=np.uint8)
    assert hsv_foreground(rgb).tolist() == [[True, False, False]]


def test_otsu_threshold_splits_two_modes() -> None:
    values = np.concatenate([np.full(100, 10), np.full(100, 200)]).astype(np.uint8)
    assert 10 <= otsu_threshold(values) < 200


def test_white_image_has_no_tissue() -> None:
    rng = np.random.default_rng(0)
    white = (245 + rng.integers(0, 10, (64, 64, 3))).astype(np.uint8)
    assert tissue_fraction(white) == 0.0


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="otsu"):
        tissue_mask(np.zeros((4, 4, 3), np.uint8), "magic")  # type: ignore[arg-type]
