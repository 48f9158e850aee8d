"""Tiles decoded on the encoder's device (engine.device_tiles) against the OpenSlide path.

The reference is ``Slide.read_tile_at_mpp`` (OpenSlide region + Pillow's antialiased resize) on
the real Aperio CMU slide (RGB stored in JPEG, shared JPEGTables, 240 px tiles, 0.499 um/px),
read at 1.0 um/px, at twice its own scale and at its own scale, and on a 3-level pyramidal
TIFF of it (levels at 0.998 and 1.996 um/px read with a sub-pixel phase). ``device="cpu"``
runs everywhere (torchvision's libjpeg-turbo decode); the same checks run on CUDA (nvJPEG)
where a GPU is present.
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.device_tiles import (
    DeviceTileDecoder,
    JpegSources,
    SourceBatches,
    decode_on_device,
    item_tiles,
    resample_weights,
    resize_regions,
    without_level_tiles,
)
from engine.encode import TileEncoder
from engine.extract import Plan
from engine.models import load_encoder
from engine.slide import open_slide
from engine.tile_reader import SlideJob, TileBatches, read_batches
from engine.tiling import TileGrid

TILE_PX = 224

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA device: nvJPEG decode not exercised"
        ),
    ),
]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def origins_of(slide_path: Path, mpp: float, n: int) -> np.ndarray:
    """(n, 2) level-0 origins of tissue tiles of the extractor's grid, spread over the slide."""
    with open_slide(slide_path) as slide:
        grid = TileGrid(slide, mpp, TILE_PX)
        rows, cols = np.nonzero(grid.selected)
        pick = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).round().astype(int))
        return np.array([grid.origin(int(rows[k]), int(cols[k])) for k in pick], np.int64)


def both(slide_path: Path, mpp: float, origins: np.ndarray, device: str):
    """(OpenSlide path tiles, device tiles (CPU numpy), failed mask), tiles (N, 224, 224, 3)."""
    with open_slide(slide_path) as slide:
        src = JpegSources.from_slide(slide)
        assert src is not None and src.fits(mpp)
        ref = np.stack([slide.read_tile_at_mpp(tuple(xy), mpp, TILE_PX) for xy in origins])
    with src:
        got = decode_on_device(src.plan(origins, mpp, TILE_PX), device)
    assert got.tiles.device.type == device and got.tiles.dtype == torch.uint8
    assert got.tiles.shape == (len(origins), TILE_PX, TILE_PX, 3)
    return ref, got.tiles.cpu().numpy(), got.failed.numpy()


def assert_close(ref: np.ndarray, got: np.ndarray) -> None:
    worst = min(psnr(a, b) for a, b in zip(ref, got, strict=True))
    assert worst >= 30.0, f"worst tile PSNR {worst:.1f} dB"
    # colour: a YCbCr/RGB mix-up shifts channel means by tens of levels
    shift = np.abs(ref.astype(np.float64).mean(axis=(0, 1, 2)) - got.mean(axis=(0, 1, 2)))
    assert shift.max() < 1.5, f"channel means differ by {shift}"


@pytest.mark.parametrize("device", DEVICES)
def test_cmu_at_1um_and_at_twice_and_once_its_scale(cmu_svs: Path, device: str) -> None:
    with open_slide(cmu_svs) as slide:
        own = slide.mpp[0]
    for mpp in (1.0, 2 * own):
        ref, got, failed = both(cmu_svs, mpp, origins_of(cmu_svs, mpp, 12), device)
        assert not failed.any()
        assert_close(ref, got)
    ref, got, _ = both(cmu_svs, own, origins_of(cmu_svs, own, 6), device)
    assert psnr(ref, got) >= (99.0 if device == "cpu" else 40.0)  # no resize: the same pixels


@pytest.mark.parametrize("device", DEVICES)
def test_reduced_levels_with_a_sub_pixel_phase(pyramidal_tiff: Path, device: str) -> None:
    """Levels 1 and 2 of the pyramid: level-0 origins that are not multiples of the downsample
    put the read box between level pixels (Pillow's box, resampled by matrix products)."""
    for mpp, level in ((1.0, 1), (2.0, 2)):
        with open_slide(pyramidal_tiff) as slide:
            assert slide.best_level_for_mpp(mpp) == level
        origins = origins_of(pyramidal_tiff, mpp, 8) + np.array([1, 3])
        ref, got, failed = both(pyramidal_tiff, mpp, origins, device)
        assert not failed.any()
        assert_close(ref, got)


def test_resize_follows_pillows_box_and_phase() -> None:
    rng = np.random.default_rng(0)
    region = rng.integers(0, 256, (300, 310, 3), dtype=np.uint8)
    crop = torch.from_numpy(region).permute(2, 0, 1)[None].contiguous()
    size = torch.tensor([[310, 300]])
    for box in [(0.3, 0.7, 290.6, 299.2), (0.0, 0.0, 310.0, 300.0), (5.5, 2.25, 230.5, 227.25)]:
        ref = np.asarray(
            Image.fromarray(region).resize((128, 128), Image.Resampling.BILINEAR, box=box)
        )
        got = resize_regions(crop, size, torch.tensor([box], dtype=torch.float64), 128)
        diff = np.abs(got[0].permute(1, 2, 0).numpy().astype(int) - ref)
        assert diff.max() <= 1, box
    w = resample_weights(
        4, torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([2]), torch.tensor([4]), 8
    )
    assert torch.equal(w[0, :, 2:6], torch.eye(4)) and not w[0, :, :2].any()  # same size: a copy


@pytest.fixture(scope="module")
def resnet18() -> TileEncoder:
    torch.manual_seed(0)
    return TileEncoder(load_encoder("resnet18-random"), torch.device("cpu"), "fp32", False)


@pytest.mark.parametrize("device", DEVICES)
def test_features_match_the_openslide_path(
    resnet18: TileEncoder, cmu_svs: Path, device: str
) -> None:
    encode = resnet18
    if device != "cpu":
        model = copy.deepcopy(resnet18.encoder)  # .to() moves a module in place
        encode = TileEncoder(model, torch.device(device), "fp32", False)
    ref, got, _ = both(cmu_svs, 1.0, origins_of(cmu_svs, 1.0, 10), device)
    cos = torch.nn.functional.cosine_similarity(
        encode(torch.from_numpy(ref)), encode(torch.from_numpy(got))
    )
    assert cos.min().item() >= 0.99


def test_edges_outside_and_absent_tiles_are_white(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        w, h = slide.dimensions
        edge = np.array([(w - 200, h - 300), (-100, -50)])
        ref = np.stack([slide.read_tile_at_mpp(tuple(xy), 1.0, TILE_PX) for xy in edge])
        src = JpegSources.from_slide(slide)
    got = decode_on_device(src.plan(np.vstack([edge, [(w + 10, 0)]]), 1.0, TILE_PX), "cpu")
    tiles = got.tiles.numpy()
    assert min(psnr(a, b) for a, b in zip(ref, tiles[:2], strict=True)) >= 30
    assert (tiles[2] == 255).all() and not got.failed.any()
    # tiles 0, 1, 10, 11 absent (a scanner's blank area): the tile over them reads white
    gap = without_level_tiles(src, 0, [0, 1, 10, 11])
    got = decode_on_device(gap.plan(np.array([(0, 0), (960, 960)]), 1.0, TILE_PX), "cpu")
    assert (got.tiles[0] == 255).all() and not got.failed.any()
    assert not (got.tiles[1] == 255).all()
    gap.close()
    src.close()


@pytest.fixture(scope="module")
def damaged_svs(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CMU slide with JPEG tile 20 (column 0, row 2) zeroed after its header."""
    with JpegSources.open(cmu_svs) as src:
        level = src._levels[0]
        start, end = int(level.offsets[20]) + 200, int(level.offsets[20] + level.counts[20])
    data = bytearray(cmu_svs.read_bytes())
    data[start:end] = bytes(end - start)
    bad = tmp_path_factory.mktemp("damaged") / "damaged.svs"
    bad.write_bytes(bytes(data))
    return bad


def test_a_corrupt_tile_fails_only_the_tiles_over_it(damaged_svs: Path, cmu_svs: Path) -> None:
    origins = np.array([(0, 480), (100, 500), (1200, 1200), (1500, 240)])  # the first two: tile 20
    with JpegSources.open(damaged_svs) as src:
        got = DeviceTileDecoder("cpu")(src.plan(origins, 1.0, TILE_PX))
    assert got.failed.tolist() == [True, True, False, False]
    assert str(damaged_svs) in got.tile_error and "JPEG tile 20 of level 0" in got.tile_error
    assert "\n" not in got.tile_error
    assert (got.tiles[:2] == 255).all()
    with JpegSources.open(cmu_svs) as src:
        clean = decode_on_device(src.plan(origins[2:], 1.0, TILE_PX), "cpu")
    assert torch.equal(got.tiles[2:], clean.tiles)
    with JpegSources.open(damaged_svs) as src:  # bytes that are not a JPEG stream at all
        lv = src._levels[0]
        lv.offsets[20] += 7
        got = decode_on_device(src.plan(origins, 1.0, TILE_PX), "cpu")
    assert got.failed.tolist() == [True, True, False, False]
    assert "not a JPEG stream" in got.tile_error


def _plan(slide_path: Path, reader: str) -> Plan:
    """Two batches of the slide's tissue tiles at 1.0 um/px, as ``extract.make_plan`` cuts them."""
    with open_slide(slide_path) as slide:
        grid = TileGrid(slide, 1.0, TILE_PX)
        rows, cols = np.nonzero(grid.selected)
        xs, ys = grid.origins[0, :, 0].astype(np.int64), grid.origins[:, 0, 1].astype(np.int64)
        job = SlideJob("cmu", str(slide_path), slide.mpp, 1.0, TILE_PX, xs, ys, reader)
    half, two = len(rows) // 2, np.zeros(2, np.int64)
    cut = {"start": np.array([0, half]), "stop": np.array([half, len(rows)])}
    return Plan([job], rows, cols, two, np.zeros((2, 2), np.int32), **cut, last=two == 0)


def test_byte_batches_through_a_worker_give_the_cpu_readers_features(
    resnet18: TileEncoder, cmu_svs: Path
) -> None:
    """End to end as extraction would run it: a DataLoader worker reads bytes, this process
    decodes them, the encoder encodes; features as the CPU reader's (OpenSlide path)."""
    plan = _plan(cmu_svs, "auto")
    dataset = SourceBatches(pickle.loads(pickle.dumps(plan)))
    decoder = DeviceTileDecoder("cpu")
    items = [item_tiles(item, decoder) for item in read_batches(dataset, workers=1)]
    ref = list(read_batches(TileBatches(_plan(cmu_svs, "openslide")), workers=0))
    assert [it["index"] for it in items] == [0, 1]
    for item, cpu in zip(items, ref, strict=True):
        assert item["sources"] is not None and not item["error"] and not item["failed"].any()
        cos = torch.nn.functional.cosine_similarity(resnet18(item["tiles"]), resnet18(cpu["tiles"]))
        assert cos.min().item() >= 0.99
    # reader "openslide" (or a slide that is not JPEG tiles): the CPU reader's tiles as they are
    dataset = SourceBatches(_plan(cmu_svs, "openslide"))
    item = dataset[0]
    assert item["sources"] is None and item_tiles(item, decoder) is item
    assert torch.equal(item["tiles"], ref[0]["tiles"])
    dataset.close()


def test_sources_pickle_and_refuse_what_they_cannot_serve(cmu_svs: Path, shared_data: Path) -> None:
    src = JpegSources.open(cmu_svs)
    origins = origins_of(cmu_svs, 1.0, 3)
    first = decode_on_device(src.plan(origins, 1.0, TILE_PX), "cpu").tiles
    clone = pickle.loads(pickle.dumps(src))
    assert torch.equal(decode_on_device(clone.plan(origins, 1.0, TILE_PX), "cpu").tiles, first)
    clone.close()
    src.close()
    src.close()  # idempotent
    png = next((shared_data / "tissue-tiles").glob("tissue-*.png"))
    assert JpegSources.open(png, mpp=0.5) is None
    empty = decode_on_device(JpegSources.open(cmu_svs).plan(np.zeros((0, 2)), 1.0, TILE_PX), "cpu")
    assert empty.tiles.shape == (0, TILE_PX, TILE_PX, 3)


def test_the_gpu_gather_cuts_the_same_regions_as_the_cpu_slices(pyramidal_tiff: Path) -> None:
    """``gather`` is what a GPU runs; checked here on the CPU against the sliced copies."""
    origins = origins_of(pyramidal_tiff, 1.0, 6) + np.array([1, 3])
    with JpegSources.open(pyramidal_tiff) as src:
        batch = src.plan(np.vstack([origins, [(-300, -200)]]), 1.0, TILE_PX)
    sliced, gathered = DeviceTileDecoder("cpu"), DeviceTileDecoder("cpu")
    gathered.gather = True
    assert not sliced.gather
    assert torch.equal(sliced(batch).tiles, gathered(batch).tiles)


def test_40x_ycbcr_slide_at_half_its_scale(cmu_svs: Path, tmp_path: Path) -> None:
    """The benchmark's generated 40x slide (YCbCr JPEG, 256 px tiles), small: 0.25 -> 0.5."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from make_40x_slide import make_40x_slide

    slide = make_40x_slide(tmp_path, scale=0.03, photometric="ycbcr", source=cmu_svs)
    origins = origins_of(slide, 0.5, 10)
    ref, got, failed = both(slide, 0.5, np.vstack([origins, origins[:3] + 1]), "cpu")
    assert not failed.any()
    assert_close(ref, got)
