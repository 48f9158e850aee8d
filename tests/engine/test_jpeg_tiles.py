"""Reduced-size JPEG reads (engine.jpeg_tiles) against the OpenSlide path, on real pixels.

The reference is ``Slide.read_tile_at_mpp`` (OpenSlide region + antialiased resize), the path
the extractor takes without the reader: the real Aperio CMU slide (RGB stored in JPEG, shared
JPEGTables, 240 px tiles) read at 1.0 um/px (1/2 of 0.499), and a small 40x slide written by
``benchmarks/make_40x_slide.py`` (YCbCr and RGB JPEG, 256 px tiles) read at 0.5 um/px.
"""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from engine.encode import TileEncoder
from engine.errors import SlideError
from engine.jpeg_tiles import JpegTileReader, decoder_name
from engine.models import load_encoder
from engine.slide import open_slide
from engine.tiling import TileGrid

REPO = Path(__file__).resolve().parents[2]
TILE_PX = 224


def _make_40x_slide():
    spec = importlib.util.spec_from_file_location(
        "make_40x_slide", REPO / "benchmarks" / "make_40x_slide.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_40x_slide


@pytest.fixture(scope="module", params=["ycbcr", "rgb"])
def slide_40x(request: pytest.FixtureRequest, cmu_svs: Path, tmp_path_factory) -> Path:
    """A 3552 x 2848 px slide at 0.25 um/px, levels /1 /4 /16 /64, JPEG tiles of 256 px."""
    out = tmp_path_factory.mktemp("slide40x")
    return _make_40x_slide()(out, scale=0.04, photometric=request.param, source=cmu_svs)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def tissue_origins(slide_path: Path, mpp: float, n: int) -> list[tuple[int, int]]:
    """``n`` tissue tiles of the extractor's grid, spread over the slide."""
    with open_slide(slide_path) as slide:
        grid = TileGrid(slide, mpp, TILE_PX)
        rows, cols = np.nonzero(grid.selected)
        pick = np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int)
        return [grid.origin(int(rows[k]), int(cols[k])) for k in pick]


def both(slide_path: Path, mpp: float, origins) -> tuple[np.ndarray, np.ndarray]:
    """(OpenSlide path tiles, reader tiles), each (N, 224, 224, 3) uint8."""
    with open_slide(slide_path) as slide:
        reader = JpegTileReader.from_slide(slide)
        assert reader is not None and reader.fits(mpp, TILE_PX)
        with reader:
            ref = np.stack([slide.read_tile_at_mpp(xy, mpp, TILE_PX) for xy in origins])
            got = np.stack([reader.read_tile(xy, mpp, TILE_PX) for xy in origins])
    return ref, got


def assert_close(ref: np.ndarray, got: np.ndarray) -> None:
    assert got.shape == ref.shape and got.dtype == np.uint8
    worst = min(psnr(a, b) for a, b in zip(ref, got, strict=True))
    assert worst >= 30.0, f"worst tile PSNR {worst:.1f} dB"
    # colour: a YCbCr/RGB mix-up shifts channel means by tens of levels
    shift = np.abs(ref.astype(np.float64).mean(axis=(0, 1, 2)) - got.mean(axis=(0, 1, 2)))
    assert shift.max() < 1.5, f"channel means differ by {shift}"


def test_cmu_aperio_rgb_jpeg_at_half_scale(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide, JpegTileReader.from_slide(slide) as reader:
        plan = reader.plan(1.0, TILE_PX)
        assert (plan.level, plan.factor) == (0, 2)
        assert plan.size == slide.read_size_at_mpp(0, 1.0, TILE_PX) == (449, 449)
    assert_close(*both(cmu_svs, 1.0, tissue_origins(cmu_svs, 1.0, 24)))


def test_40x_slide_at_half_scale(slide_40x: Path) -> None:
    with open_slide(slide_40x) as slide:
        assert slide.mpp == pytest.approx((0.25, 0.25))
        assert slide.level_count == 4
    origins = tissue_origins(slide_40x, 0.5, 24)
    ref, got = both(slide_40x, 0.5, origins)
    assert_close(ref, got)
    assert np.median([psnr(a, b) for a, b in zip(ref, got, strict=True)]) >= 36.0
    # origins off the even grid: a half reduced pixel of phase, resampled
    assert_close(*both(slide_40x, 0.5, [(x + 1, y + 3) for x, y in origins[:8]]))


def test_levels_factors_and_read_sizes_follow_the_slide(slide_40x: Path) -> None:
    with open_slide(slide_40x) as slide, JpegTileReader.from_slide(slide) as reader:
        for mpp, factor in [
            (0.5, 2),
            (0.75, 2),
            (1.0, None),
            (2.0, 2),
            (4.0, None),
            (64, 4),
            (130, 8),
        ]:
            plan = reader.plan(mpp, TILE_PX)
            assert (plan.factor if plan else None) == factor, mpp
            if plan is not None:
                level = slide.best_level_for_mpp(mpp)
                assert plan.level == level
                assert plan.size == slide.read_size_at_mpp(level, mpp, TILE_PX)
        assert not reader.fits(0.25, TILE_PX)
        with pytest.raises(ValueError, match="not a 1/2"):
            reader.read_tile((0, 0), 0.25, TILE_PX)
        assert_close(*both(slide_40x, 2.0, [(0, 0), (900, 400), (1700, 1000)]))  # level 1 at 1/2


def test_a_scanner_near_40x_is_read_enlarging_slightly(slide_40x: Path) -> None:
    with open_slide(slide_40x, mpp=0.2630) as slide, JpegTileReader.from_slide(slide) as reader:
        assert reader.plan(0.5, TILE_PX).factor == 2  # 1.90x: decode at 1/2, enlarge by 5%
        origins = [(800 + 450 * k, 1200) for k in range(4)]
        for xy in origins:
            assert (
                psnr(slide.read_tile_at_mpp(xy, 0.5, TILE_PX), reader.read_tile(xy, 0.5, TILE_PX))
                >= 30
            )


@pytest.fixture(scope="module")
def resnet18() -> TileEncoder:
    torch.manual_seed(0)
    return TileEncoder(load_encoder("resnet18-random"), torch.device("cpu"), "fp32", False)


def min_feature_cosine(encode: TileEncoder, path: Path, mpp: float, n: int = 12) -> float:
    ref, got = both(path, mpp, tissue_origins(path, mpp, n))
    cos = torch.nn.functional.cosine_similarity(
        encode(torch.from_numpy(ref)), encode(torch.from_numpy(got))
    )
    return cos.min().item()


def test_features_match_the_openslide_path_on_cmu(resnet18: TileEncoder, cmu_svs: Path) -> None:
    assert min_feature_cosine(resnet18, cmu_svs, 1.0) >= 0.99


def test_features_match_the_openslide_path_at_40x(resnet18: TileEncoder, slide_40x: Path) -> None:
    assert min_feature_cosine(resnet18, slide_40x, 0.5) >= 0.99


def test_edges_and_outside_are_white_as_in_openslide(slide_40x: Path) -> None:
    with open_slide(slide_40x) as slide, JpegTileReader.from_slide(slide) as reader:
        w, h = slide.dimensions
        for xy in [(-224, -224), (w - 200, h - 300), (w + 10, 0), (-448, -448)]:
            ref, got = slide.read_tile_at_mpp(xy, 0.5, TILE_PX), reader.read_tile(xy, 0.5, TILE_PX)
            assert got.shape == (TILE_PX, TILE_PX, 3)
            assert psnr(ref, got) >= 30, xy
        assert (reader.read_tile((-448, -448), 0.5, TILE_PX) == 255).all()


def test_decoders_agree_and_reader_pickles(cmu_svs: Path) -> None:
    reader = JpegTileReader.open(cmu_svs)
    assert reader.decoder == decoder_name()
    xy = tissue_origins(cmu_svs, 1.0, 3)[1]
    first = reader.read_tile(xy, 1.0, TILE_PX)
    clone = pickle.loads(pickle.dumps(reader))
    assert np.array_equal(clone.read_tile(xy, 1.0, TILE_PX), first)
    other = JpegTileReader.open(cmu_svs)
    other.decoder = "pillow"  # Pillow's draft is libjpeg-turbo's scaling too: the same pixels
    assert np.array_equal(other.read_tile(xy, 1.0, TILE_PX), first)
    other.close()
    clone.close()
    reader.close()
    reader.close()  # idempotent


def test_slides_that_are_not_jpeg_tiled_tiff_get_none(shared_data: Path, tmp_path: Path) -> None:
    png = next((shared_data / "tissue-tiles").glob("tissue-*.png"))
    assert JpegTileReader.open(png, mpp=0.5) is None  # a plain image
    lzw = tmp_path / "lzw.tiff"
    img = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(
        lzw, img, tile=(256, 256), photometric="rgb", compression="zlib",
        resolution=(40000, 40000), resolutionunit="CENTIMETER",
    )  # fmt: skip
    assert JpegTileReader.open(lzw) is None


def test_a_damaged_tile_raises_slide_error(cmu_svs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "damaged.svs"
    data = bytearray(cmu_svs.read_bytes())
    with tifffile.TiffFile(cmu_svs) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[20], page.databytecounts[20]
    data[offset + 200 : offset + count] = b"\x00" * (count - 200)
    bad.write_bytes(bytes(data))
    with JpegTileReader.open(bad) as reader:
        tx, ty = 20 % 10, 20 // 10  # 10 tiles across (2220 / 240)
        with pytest.raises(SlideError, match="JPEG tile 20 of level 0"):
            reader.read_tile((tx * 240, ty * 240), 1.0, TILE_PX)
        assert reader.read_tile((0, 0), 1.0, TILE_PX).shape == (TILE_PX, TILE_PX, 3)
