"""sample_data/: the committed synthetic slide, its ground-truth mask, and the generator script."""

from __future__ import annotations

import colorsys
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "sample_data"
SCRIPT = SAMPLE / "make_sample_slide.py"
SLIDE = SAMPLE / "sample_slide.tiff"
MASK = SAMPLE / "sample_slide_mask.png"
SIDECAR = SAMPLE / "sample_slide_mask.json"

FACTOR = 8  # the mask is level 0 / 8
TILE = 224  # the pipeline's tile: 224 px at 0.5 um/px = 224 level-0 px
TILE_M = TILE // FACTOR  # the same tile in mask pixels
LABELS = {
    0: "background",
    1: "tumour-like",
    2: "stroma",
    3: "gland-like",
    4: "green ink",
    5: "blue ink",
    6: "fold",
    7: "blur",
}


@pytest.fixture(scope="module")
def mask() -> np.ndarray:
    return np.asarray(Image.open(MASK))


@pytest.fixture(scope="module")
def slide():
    with openslide.OpenSlide(SLIDE) as s:
        yield s


def tile_labels(mask: np.ndarray, pure: bool = False) -> np.ndarray:
    """Label of each whole 224-px tile (rows, cols): the majority label (> 50 %) or -1.

    With ``pure``, a tile gets a label only when every mask pixel in it has that label.
    """
    rows, cols = mask.shape[0] // TILE_M, mask.shape[1] // TILE_M
    blocks = mask[: rows * TILE_M, : cols * TILE_M].reshape(rows, TILE_M, cols, TILE_M)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(rows, cols, -1)
    counts = np.stack([(blocks == k).sum(-1) for k in LABELS], -1)
    best = counts.argmax(-1)
    need = TILE_M * TILE_M if pure else TILE_M * TILE_M // 2 + 1
    return np.where(counts.max(-1) >= need, best, -1)


def read_tiles(slide, mask: np.ndarray, label: int, n: int = 8) -> list[np.ndarray]:
    """Up to ``n`` level-0 RGB tiles (224, 224, 3) lying wholly inside ``label``, spread out."""
    rc = np.argwhere(tile_labels(mask, pure=True) == label)
    assert len(rc) > 0, f"no tile lies wholly inside label {label}"
    pick = rc[np.linspace(0, len(rc) - 1, min(n, len(rc))).astype(int)]
    return [
        np.asarray(
            slide.read_region((int(c) * TILE, int(r) * TILE), 0, (TILE, TILE)).convert("RGB")
        )
        for r, c in pick
    ]


def mean_hsv(tiles: list[np.ndarray]) -> tuple[float, float, float]:
    """Hue in degrees, saturation and value of the mean colour of ``tiles``."""
    rgb = np.mean([t.reshape(-1, 3).mean(0) for t in tiles], 0) / 255.0
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    return h * 360.0, s, v


def hue_distance(a: float, b: float) -> float:
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


# ----------------------------------------------------------------------------- committed files


def test_slide_is_a_generic_tiff_pyramid_at_half_micron(slide, mask):
    assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert slide.level_count >= 3
    np.testing.assert_allclose(slide.level_downsamples[:3], [1.0, 2.0, 4.0])
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
    assert slide.dimensions == (mask.shape[1] * FACTOR, mask.shape[0] * FACTOR)
    assert SLIDE.stat().st_size < 8e6  # "a few MB"


def test_tiff_tiles_are_jpeg_256(slide):
    with tifffile.TiffFile(SLIDE) as tif:
        assert len(tif.pages) == slide.level_count
        for page in tif.pages:
            assert page.is_tiled and page.tile == (256, 256)
            assert page.compression == tifffile.COMPRESSION.JPEG


def test_background_is_near_white_and_tissue_is_not(slide, mask):
    bg = mean_hsv(read_tiles(slide, mask, 0))
    assert bg[2] > 240 / 255 and bg[1] < 0.05
    for lab in (1, 2, 3):
        assert mean_hsv(read_tiles(slide, mask, lab))[1] > 0.15, LABELS[lab]


def test_mask_has_every_label_and_documents_them(mask):
    assert mask.dtype == np.uint8
    assert set(np.unique(mask).tolist()) == set(LABELS)
    meta = json.loads(SIDECAR.read_text())
    assert meta["mask_factor"] == FACTOR
    assert sorted(int(k) for k in meta["labels"]) == sorted(LABELS)
    assert meta["mask_shape_hw"] == list(mask.shape)
    text = Image.open(MASK).text
    assert int(text["mask_factor"]) == FACTOR
    assert json.loads(text["histocluster_labels"]) == meta["labels"]


def test_each_artefact_covers_at_least_30_tiles(mask):
    tiles = tile_labels(mask)
    for lab in (4, 5, 6, 7):
        assert (tiles == lab).sum() >= 30, LABELS[lab]
    for lab in (1, 2, 3):
        assert (tiles == lab).sum() >= 20, LABELS[lab]


def test_ink_colours_differ_from_tissue_and_from_each_other(slide, mask):
    tissue = mean_hsv([t for lab in (1, 2, 3) for t in read_tiles(slide, mask, lab, 4)])
    green = mean_hsv(read_tiles(slide, mask, 4))
    blue = mean_hsv(read_tiles(slide, mask, 5))
    assert 270 <= tissue[0] <= 345  # pink/purple H&E
    assert 90 <= green[0] <= 180
    assert 200 <= blue[0] <= 250
    for ink in (green, blue):
        assert hue_distance(ink[0], tissue[0]) > 60
    assert hue_distance(green[0], blue[0]) > 40


def test_fold_is_darker_and_more_saturated_than_the_stroma_it_doubles(slide, mask):
    fold = mean_hsv(read_tiles(slide, mask, 6))
    stroma = mean_hsv(read_tiles(slide, mask, 2))
    assert fold[2] < stroma[2] - 0.02
    assert fold[1] > stroma[1] + 0.05


def laplacian_variance(rgb: np.ndarray) -> float:
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(ndi.laplace(grey).var())


def test_blur_patch_is_smoother_than_the_same_texture_in_focus(slide, mask):
    blurred = np.median([laplacian_variance(t) for t in read_tiles(slide, mask, 7)])
    sharp = np.median([laplacian_variance(t) for t in read_tiles(slide, mask, 1)])
    assert blurred < 0.2 * sharp, (blurred, sharp)


# ----------------------------------------------------------------------------- the script


def test_tiny_regeneration_is_deterministic_and_seeded(tmp_path):
    size = ["--width", "448", "--height", "336", "--quiet"]
    runs = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        res = run_script("--out-dir", str(tmp_path / name), "--seed", seed, *size)
        assert res.returncode == 0, res.stderr
        out = tmp_path / name
        runs[name] = (
            np.asarray(Image.open(out / "sample_slide_mask.png")),
            tifffile.imread(out / "sample_slide.tiff", key=0),
        )
    (mask_a, img_a), (mask_b, img_b), (_, img_c) = runs["a"], runs["b"], runs["c"]
    assert mask_a.shape == (336 // FACTOR, 448 // FACTOR)
    assert img_a.shape == (336, 448, 3)
    np.testing.assert_array_equal(mask_a, mask_b)
    np.testing.assert_array_equal(img_a, img_b)
    assert not np.array_equal(img_a, img_c)
    assert set(np.unique(mask_a).tolist()) == set(LABELS)  # same layout in miniature
    with openslide.OpenSlide(tmp_path / "a" / "sample_slide.tiff") as s:
        assert s.level_count >= 3
        assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)


def test_bad_size_is_a_one_line_error(tmp_path):
    res = run_script("--out-dir", str(tmp_path), "--width", "500")
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --width"), res.stderr
    assert not (tmp_path / "sample_slide.tiff").exists()
