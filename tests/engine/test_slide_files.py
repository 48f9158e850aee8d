"""Which files are slides, and the guards before a reader is chosen: truncation, decompression bombs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.errors import SlideError
from engine.slide import (
    MAX_IMAGE_PIXELS_ENV,
    SLIDE_SUFFIXES,
    SlideCache,
    find_slides,
    is_slide_file,
    open_slide,
)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99, 0.999])
def test_truncated_svs_is_refused_as_truncated_not_as_missing_mpp(
    cmu_svs: Path, tmp_path: Path, fraction: float
) -> None:
    data = cmu_svs.read_bytes()
    cut = tmp_path / "cut.svs"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(SlideError, match="truncated") as info:
        open_slide(cut)
    assert str(cut) in str(info.value) and "\n" not in str(info.value)


def test_truncated_tiff_is_refused_whatever_its_suffix(cmu_svs: Path, tmp_path: Path) -> None:
    data = cmu_svs.read_bytes()
    cut = tmp_path / "renamed.dat"
    cut.write_bytes(data[: int(len(data) * 0.95)])
    with pytest.raises(SlideError, match="truncated"):
        open_slide(cut)


def test_complete_slides_still_open(cmu_svs: Path, pyramidal_tiff: Path) -> None:
    with open_slide(cmu_svs) as s:
        assert s.dimensions == (2220, 2967)
    with open_slide(pyramidal_tiff) as s:
        assert s.level_count == 3


def test_plain_image_over_the_pixel_limit_is_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(path)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(300 * 400 - 1))
    with pytest.raises(SlideError, match=MAX_IMAGE_PIXELS_ENV) as info:
        open_slide(path, mpp=0.5)
    assert "300" in str(info.value) and "pyramidal" in str(info.value)
    monkeypatch.setenv(MAX_IMAGE_PIXELS_ENV, str(300 * 400))
    with open_slide(path, mpp=0.5) as s:
        assert s.dimensions == (400, 300)


def test_pil_limit_is_lifted_only_inside_slide_reads(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None  # nothing lifted it at import
    path = tmp_path / "p.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(path)
    open_slide(path, mpp=1.0)
    assert Image.MAX_IMAGE_PIXELS == before


def test_find_slides_uses_the_one_suffix_list(tmp_path: Path) -> None:
    for name in ("a.svs", "b.NDPI", "c.png", "notes.txt", "d.zarr"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.tiff").write_bytes(b"x")
    assert [p.name for p in find_slides(tmp_path)] == ["a.svs", "b.NDPI", "c.png"]
    assert [p.name for p in find_slides(tmp_path, recursive=True)] == [
        "a.svs",
        "b.NDPI",
        "c.png",
        "e.tiff",
    ]
    assert is_slide_file("x.mrxs") and not is_slide_file("x.txt")
    assert ".dcm" not in SLIDE_SUFFIXES


def test_slide_cache_keeps_at_most_capacity_and_reopens_forgotten(
    cmu_svs: Path, pyramidal_tiff: Path
) -> None:
    import pickle

    cache = SlideCache(capacity=1)
    a = cache.get(cmu_svs)
    assert cache.get(cmu_svs) is a and len(cache) == 1
    cache.get(pyramidal_tiff)
    assert len(cache) == 1 and cache.get(cmu_svs) is not a
    b = cache.get(cmu_svs)
    cache.forget(cmu_svs)
    assert len(cache) == 0 and cache.get(cmu_svs) is not b
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone) == 0 and clone.capacity == 1
    cache.close()
    assert len(cache) == 0
