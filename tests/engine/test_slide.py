"""engine.slide on the real CMU SVS, a pyramidal TIFF written from it, bad files and plain PNGs."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import MissingMppError, SlideError
from engine.slide import ArraySlide, open_slide, slide_id
from tests.helpers import decode_svs_level0


def test_cmu_svs_dimensions_and_mpp(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        assert slide.level_count == 1
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert set(slide.associated_images) >= {"label", "macro", "thumbnail"}
        assert slide.associated_images["label"].dtype == np.uint8


def test_cmu_region_equals_tifffile_decoding(cmu_svs: Path) -> None:
    reference = decode_svs_level0(cmu_svs)
    with open_slide(cmu_svs) as slide:
        region = slide.read_region((700, 1200), 0, (300, 200))
    assert region.shape == (200, 300, 3) and region.dtype == np.uint8
    expected = reference[1200:1400, 700:1000]
    # Both decode the same JPEG tiles; decoders may round differently by a grey level or two.
    assert np.abs(region.astype(int) - expected.astype(int)).mean() < 1.0
    assert np.abs(region.astype(int) - expected.astype(int)).max() <= 8


def test_region_outside_slide_is_white(cmu_svs: Path) -> None:
    with open_slide(cmu_svs) as slide:
        region = slide.read_region((2100, 2900), 0, (200, 200))
    assert (region[100:, 150:] == 255).all()  # beyond the 2220 x 2967 border
    assert region[:60, :100].mean() < 255  # inside the slide, real pixels


def test_mpp_argument_overrides_metadata(cmu_svs: Path) -> None:
    with open_slide(cmu_svs, mpp=0.25) as slide:
        assert slide.mpp == (0.25, 0.25)


def test_pyramid_level_choice(pyramidal_tiff: Path) -> None:
    with open_slide(pyramidal_tiff) as slide:
        assert slide.level_count == 3
        assert slide.mpp == pytest.approx((0.499, 0.499))
        assert [slide.best_level_for_mpp(m) for m in (0.5, 1.0, 2.0)] == [0, 1, 2]
        assert slide.best_level_for_mpp(0.25) == 0  # nothing finer: the finest level
        assert slide.best_level_for_mpp(0.9) == 0  # level 1 (0.998) is coarser than 0.9


def test_tiles_of_equal_physical_size_from_different_levels(pyramidal_tiff: Path) -> None:
    """The same 224 um square read at 1.0 and 2.0 um/px shows the same tissue."""
    with open_slide(pyramidal_tiff) as slide:
        fine = slide.read_tile_at_mpp((800, 1400), 1.0, 224)
        coarse = slide.read_tile_at_mpp((800, 1400), 2.0, 112)
        elsewhere = slide.read_tile_at_mpp((200, 200), 2.0, 112)
    assert fine.shape == (224, 224, 3) and coarse.shape == (112, 112, 3)
    fine_small = np.asarray(Image.fromarray(fine).resize((112, 112), Image.Resampling.BILINEAR))
    same = np.abs(fine_small.astype(int) - coarse.astype(int)).mean()
    different = np.abs(elsewhere.astype(int) - coarse.astype(int)).mean()
    assert same < 6 < different


def test_thumbnail_keeps_aspect(pyramidal_tiff: Path) -> None:
    with open_slide(pyramidal_tiff) as slide:
        thumb = slide.thumbnail(300)
    assert max(thumb.shape[:2]) == 300
    assert thumb.shape[1] / thumb.shape[0] == pytest.approx(2220 / 2967, rel=0.02)


def test_truncated_svs_is_a_clear_error(cmu_svs: Path, tmp_path: Path) -> None:
    data = cmu_svs.read_bytes()
    bad = tmp_path / "truncated.svs"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SlideError, match="truncated.svs"):
        with open_slide(bad) as slide:
            slide.read_region((0, 0), 0, (2220, 2967))


def test_text_file_renamed_svs_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.svs"
    bad.write_text("this is not a slide\n")
    with pytest.raises(SlideError, match="notes.svs") as info:
        open_slide(bad)
    assert "\n" not in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match="nope.svs"):
        open_slide(tmp_path / "nope.svs")


def test_png_without_mpp_asks_for_it(tmp_path: Path) -> None:
    path = tmp_path / "patch.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(path)
    with pytest.raises(MissingMppError, match=r"patch.png.*--slide-mpp"):
        open_slide(path)


def test_png_with_mpp_behaves_like_a_slide(tmp_path: Path) -> None:
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :30, 3] = 255  # left half opaque red, right half transparent
    path = tmp_path / "patch.png"
    Image.fromarray(rgba).save(path)
    with open_slide(path, mpp=0.5) as slide:
        assert isinstance(slide, ArraySlide)
        assert slide.dimensions == (60, 40) and slide.level_count == 1
        region = slide.read_region((20, 0), 0, (20, 10))
        assert tuple(region[0, 0]) == (200, 0, 0)
        assert tuple(region[0, -1]) == (255, 255, 255)  # transparent on white
        tile = slide.read_tile_at_mpp((0, 0), 1.0, 10)  # 20 px of 0.5 um -> 10 px of 1.0 um
        assert tile.shape == (10, 10, 3) and tuple(tile[5, 5]) == (200, 0, 0)


def test_tiff_resolution_gives_mpp_of_plain_tiff(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(
        path, dpi=(25400 / 0.25, 25400 / 0.25)
    )
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx((0.25, 0.25), rel=1e-3)


def test_slides_pickle_by_path(pyramidal_tiff: Path) -> None:
    with open_slide(pyramidal_tiff) as slide:
        copy = pickle.loads(pickle.dumps(slide))
        assert copy.path == slide.path and copy.mpp == slide.mpp
        assert np.array_equal(
            copy.read_region((10, 10), 1, (32, 32)), slide.read_region((10, 10), 1, (32, 32))
        )
        copy.close()


def test_slide_id_is_a_safe_stem(tmp_path: Path, cmu_svs: Path) -> None:
    assert slide_id(cmu_svs) == "CMU-1-Small-Region"
    assert slide_id("/a/b/case 12 (HE).ome.tiff") == "case_12__HE_"
    copy = tmp_path / "x.svs"
    shutil.copy(cmu_svs, copy)
    assert slide_id(copy) == "x"
