"""The tissue mask made strip by strip is the whole-image mask, bit for bit.

Strips bound the tissue stage's memory (issue 16: peak RSS within 10% between a slide and one of
4x its area); the mask, and so the tiles selected, must not change: the thumbnail, the HSV
threshold, Otsu's histogram, the closing and the tile fractions are each compared with the
whole-image computation on real slides (the CMU SVS, a pyramidal TIFF made from it with
non-integer level downsamples, the benchmark's generated 40x slide) and on random images.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from engine.slide import ArraySlide, open_slide
from engine.tiling import TileGrid, tile_fractions
from engine.tissue import tissue_mask, tissue_mask_of_strips

REPO = Path(__file__).resolve().parents[2]


def _strips(image: np.ndarray, rows: int) -> list[np.ndarray]:
    return [image[y : y + rows] for y in range(0, len(image), rows)]


@pytest.fixture(scope="module")
def slide_40x(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The benchmark's generated 40x slide, small (levels /1 /4 /16 /64, YCbCr JPEG tiles)."""
    spec = importlib.util.spec_from_file_location(
        "make_40x_slide", REPO / "benchmarks" / "make_40x_slide.py"
    )
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_40x_slide(tmp_path_factory.mktemp("s40x"), scale=0.06, source=cmu_svs)


@pytest.fixture(scope="module", params=["svs", "pyramid", "40x"])
def real_slide(
    request: pytest.FixtureRequest, cmu_svs: Path, pyramidal_tiff: Path, slide_40x: Path
) -> Path:
    return {"svs": cmu_svs, "pyramid": pyramidal_tiff, "40x": slide_40x}[request.param]


@pytest.mark.parametrize("max_px", [300, 1024, 1500])
def test_thumbnail_strips_are_the_thumbnail(real_slide: Path, max_px: int) -> None:
    with open_slide(real_slide) as slide:
        ref = slide.thumbnail(max_px)
        for rows in (1, 97):
            got = list(slide.thumbnail_strips(max_px, rows))
            assert np.array_equal(np.concatenate(got), ref), (max_px, rows)
            assert max(len(s) for s in got) <= rows


def test_thumbnail_strips_of_a_plain_image() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    slide = ArraySlide(rgb, 0.5)
    assert np.array_equal(np.concatenate(list(slide.thumbnail_strips(64, 7))), slide.thumbnail(64))


@pytest.mark.parametrize(
    ("method", "bounds"),
    [
        ("otsu", {}),
        ("otsu", {"min_saturation": 5, "max_saturation": 90}),
        ("hsv", {}),
        ("hsv", {"hue": (0.7, 0.98), "min_saturation": 0.1, "value": (0.3, 0.95)}),
    ],
)
def test_mask_of_strips_is_the_whole_mask(real_slide: Path, method: str, bounds: dict) -> None:
    with open_slide(real_slide) as slide:
        thumb = slide.thumbnail(1024)
    for clean in (True, False):
        ref = tissue_mask(thumb, method, clean=clean, **bounds)  # type: ignore[arg-type]
        for rows in (1, 2, 3, 37, len(thumb)):
            got = tissue_mask_of_strips(_strips(thumb, rows), method, clean=clean, **bounds)  # type: ignore[arg-type]
            assert np.array_equal(got, ref), (method, clean, rows)


def test_mask_of_strips_on_random_speckle() -> None:
    """Pinholes and fibres at every strip boundary: the closing sees its 2 rows of context."""
    rng = np.random.default_rng(2)
    rgb = np.where(rng.random((150, 90, 1)) < 0.5, (180, 60, 140), (250, 250, 250)).astype(np.uint8)
    for method in ("otsu", "hsv"):
        ref = tissue_mask(rgb, method)  # type: ignore[arg-type]
        for rows in (1, 4, 64, 65):
            assert np.array_equal(tissue_mask_of_strips(_strips(rgb, rows), method), ref)  # type: ignore[arg-type]


def test_mask_of_strips_rejects_an_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown tissue method"):
        tissue_mask_of_strips([np.zeros((4, 4, 3), np.uint8)], "magic")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["otsu", "hsv"])
@pytest.mark.parametrize("stride_px", [224, 150])
def test_grid_tissue_is_the_whole_image_result(
    real_slide: Path, method: str, stride_px: int
) -> None:
    with open_slide(real_slide) as slide:
        grid = TileGrid(slide, 0.5, 224, stride_px=stride_px, tissue_method=method)  # type: ignore[arg-type]
        ref = tissue_mask(slide.thumbnail(grid.thumbnail_px), method)  # type: ignore[arg-type]
        assert np.array_equal(grid.tissue_mask, ref)
        fractions = grid.tissue
        assert np.array_equal(fractions, _fractions_by_brute_force(ref, grid))


def _fractions_by_brute_force(mask: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Each tile's mask pixels counted one tile at a time (the rule of ``tile_fractions``)."""
    h, w = mask.shape
    sx, sy = w / grid.slide.dimensions[0], h / grid.slide.dimensions[1]
    out = np.zeros(grid.shape, np.float32)
    for r in range(grid.rows):
        for c in range(grid.cols):
            ox, oy = grid.origins[r, c]
            x0, y0 = round(ox * sx), round(oy * sy)
            x1 = max(round((ox + grid.tile_l0_xy[0]) * sx), x0 + 1)
            y1 = max(round((oy + grid.tile_l0_xy[1]) * sy), y0 + 1)
            covered = mask[max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)].sum()
            out[r, c] = np.float32(covered / ((x1 - x0) * (y1 - y0)))
    return out


def test_tile_fractions_of_overlapping_and_edge_tiles() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((53, 71)) < 0.4
    xs, ys = np.arange(0, 80, 7), np.arange(0, 60, 5)
    origins = np.stack(np.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
    got = tile_fractions(mask, (71, 53), origins, (11.0, 9.0))
    for r in range(len(ys)):
        for c in range(len(xs)):
            x, y = origins[r, c]
            assert got[r, c] == np.float32(mask[y : y + 9, x : x + 11].sum() / 99), (r, c)
