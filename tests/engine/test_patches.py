"""engine.patches: sources, per-slide caps, fraction rule, CSV round trip, the two-view dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.augment import AugmentConfig, TwoViews, build_transform
from engine.errors import HistoclusterError, SlideError
from engine.patches import (
    PatchDataset,
    PatchRecord,
    build_patch_set,
    find_sources,
    load_patch,
    read_patch_csv,
    sample_slide_patches,
    subsample_fraction,
    write_patch_csv,
)
from engine.progress import Cancelled
from engine.slide import SLIDE_SUFFIXES, SlideCache, open_slide
from engine.tiling import TileGrid

torch.set_num_threads(1)


def _write(path: Path, size=(40, 30), mode="RGB", seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = (rng.random((size[1], size[0], ch)) * 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if ch == 1 else arr, mode).save(path)
    return path


@pytest.fixture
def image_tree(tmp_path) -> Path:
    root = tmp_path / "imgs"
    _write(root / "a" / "one.png")
    _write(root / "a" / "b" / "c" / "two.jpg", seed=1)
    _write(root / "three.tif", size=(16, 16), seed=2)
    _write(root / "rgba.png", mode="RGBA", seed=3)
    _write(root / "gray.png", mode="L", seed=4)
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def test_find_sources_any_depth(image_tree):
    slides, images = find_sources(image_tree)
    assert slides == []
    assert [p.relative_to(image_tree).as_posix() for p in images] == [
        "a/b/c/two.jpg", "a/one.png", "gray.png", "rgba.png", "three.tif",
    ]  # fmt: skip


def test_find_sources_tells_slides_from_plain_tiffs(shared_data):
    slides, images = find_sources(shared_data / "slides")
    assert [p.name for p in slides] == ["CMU-1-Small-Region.svs"] and images == []
    slides, images = find_sources(shared_data / "patches" / "nct-crc-he-100k-nonorm-sample9")
    assert slides == [] and len(images) == 9


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(HistoclusterError, match="no such file"):
        find_sources(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoclusterError, match="no slides or PNG/JPEG/TIFF"):
        build_patch_set([tmp_path / "empty"])


@pytest.mark.parametrize(
    "n,fraction,expected",
    [(1000, 0.1, 100), (50, 0.01, 10), (5, 0.01, 5), (100_000, 0.1, 2000), (30, 1.0, 30)],
)
def test_fraction_rule_min_10_max_2000(n, fraction, expected):
    recs = [PatchRecord("d", "image", f"{i}.png") for i in range(n)]
    got = subsample_fraction(recs, fraction, np.random.default_rng(0))
    assert len(got) == expected
    assert len({r.path for r in got}) == expected


def test_fraction_out_of_range():
    with pytest.raises(ValueError):
        subsample_fraction([], 0.0, np.random.default_rng(0))


def test_slide_patches_capped_random_tissue_tiles(cmu_svs):
    with open_slide(cmu_svs) as slide:
        grid = TileGrid(slide, target_mpp=1.0, tile_px=64)
        a = sample_slide_patches(slide, "d", np.random.default_rng(0), 1.0, 64, max_per_slide=20)
        b = sample_slide_patches(slide, "d", np.random.default_rng(0), 1.0, 64, max_per_slide=20)
        c = sample_slide_patches(slide, "d", np.random.default_rng(1), 1.0, 64, max_per_slide=20)
        all_ = sample_slide_patches(slide, "d", np.random.default_rng(0), 1.0, 64, 10**6)
        selected = {
            tuple(grid.origins[r, c]) for r, c in zip(*np.nonzero(grid.selected), strict=True)
        }
    assert len(a) == 20 and a == b and a != c
    assert len({(r.l0_x, r.l0_y) for r in a}) == 20  # no repeats
    assert {(r.l0_x, r.l0_y) for r in all_} == selected  # every tissue tile, nothing else
    assert 20 < len(selected) < grid.rows * grid.cols  # background was filtered out
    assert a[0].kind == "slide" and a[0].target_mpp == 1.0 and a[0].tile_px == 64


def test_build_mixed_set_csv_round_trip_and_reload(cmu_svs, image_tree, tmp_path):
    recs = build_patch_set([cmu_svs, image_tree], mpp=1.0, patch_px=64, max_per_slide=7, seed=3)
    kinds = [r.kind for r in recs]
    assert kinds.count("slide") == 7 and kinds.count("image") == 5
    assert {r.dataset for r in recs} == {str(cmu_svs), str(image_tree)}
    assert recs == build_patch_set(
        [cmu_svs, image_tree], mpp=1.0, patch_px=64, max_per_slide=7, seed=3
    )
    csv_path = tmp_path / "patches.csv"
    write_patch_csv(recs, csv_path)
    assert read_patch_csv(csv_path) == recs
    assert build_patch_set([csv_path]) == recs  # --data patches.csv reproduces the set
    # the slide tile read from a record is the grid's tile
    r = recs[0]
    with open_slide(cmu_svs) as slide:
        ref = slide.read_tile_at_mpp((r.l0_x, r.l0_y), 1.0, 64)
    assert np.array_equal(load_patch(r, 64, SlideCache()), ref)


def test_fraction_applies_per_dataset(image_tree, tmp_path):
    big = tmp_path / "big"
    for i in range(40):
        _write(big / f"{i:02d}.png", size=(8, 8), seed=i)
    recs = build_patch_set([image_tree, big], fraction=0.5, seed=0)
    per = {d: sum(r.dataset == d for r in recs) for d in (str(image_tree), str(big))}
    assert per == {str(image_tree): 5, str(big): 20}  # 5 images: min 10 caps at what exists


def test_bad_csv(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(HistoclusterError, match="not a patches CSV"):
        read_patch_csv(p)


def test_dataset_two_views_and_raw_patches(image_tree):
    recs = build_patch_set([image_tree])
    raw = PatchDataset(recs, patch_px=24)
    for i in range(len(raw)):
        x = raw[i]
        assert x.shape == (3, 24, 24) and x.dtype == torch.uint8
    ds = PatchDataset(recs, 24, TwoViews(build_transform(AugmentConfig(size=20))))
    a, b = ds[0]
    assert a.shape == b.shape == (3, 20, 20) and a.dtype == torch.float32
    assert not torch.equal(a, b)
    clone = pickle.loads(pickle.dumps(ds))  # what DataLoader workers receive
    assert clone[1][0].shape == (3, 20, 20)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((10, 10, 4), np.uint8)  # fully transparent
    Image.fromarray(arr, "RGBA").save(tmp_path / "t.png")
    out = load_patch(PatchRecord("d", "image", str(tmp_path / "t.png")), 10, SlideCache())
    assert (out == 255).all()


def test_preload_matches_lazy_and_drops_unreadable(image_tree, cmu_svs):
    bad = image_tree / "zz_truncated.png"
    bad.write_bytes((image_tree / "a" / "one.png").read_bytes()[:60])
    recs = build_patch_set([image_tree, cmu_svs], mpp=1.0, patch_px=32, max_per_slide=3)
    lazy = PatchDataset(recs, 32)
    with pytest.raises(SlideError, match="zz_truncated.png"):
        [lazy[i] for i in range(len(lazy))]
    pre = PatchDataset(recs, 32)
    seen = []
    dropped = pre.preload(progress=lambda *a: seen.append(a))
    assert seen[0] == ("preload", 0, len(recs)) and seen[-1] == ("preload", len(recs), len(recs))
    assert len(dropped) == 1 and "zz_truncated.png" in dropped[0]
    assert len(pre) == len(recs) - 1 and pre.preloaded.shape == (len(pre), 3, 32, 32)
    good = [i for i, r in enumerate(recs) if "zz_truncated" not in r.path]
    for j, i in enumerate(good):
        assert torch.equal(pre[j], lazy[i])
    views = pre.with_transform(TwoViews(build_transform(AugmentConfig(size=16))))
    assert views.preloaded is pre.preloaded and len(views) == len(pre)
    assert views[0][0].shape == (3, 16, 16)


def test_one_suffix_list_and_unrecognised_slides_are_named(image_tree, cmu_svs, tmp_path):
    """Candidates come from engine.slide's list (no .dcm there: no DICOM test data); a slide file
    OpenSlide does not recognise is skipped with a warning naming it, not silently."""
    assert ".dcm" not in SLIDE_SUFFIXES
    (image_tree / "scan.dcm").write_bytes(b"DICM" * 64)
    bad = image_tree / "broken.svs"
    bad.write_bytes(cmu_svs.read_bytes()[:2000])
    slides, images = find_sources(image_tree)
    assert slides == [] and "scan.dcm" not in {p.name for p in images}
    logs = []
    recs = build_patch_set([image_tree, cmu_svs], mpp=1.0, patch_px=64, max_per_slide=2,
                           log=logs.append)  # fmt: skip
    assert len(recs) == 7 and not any("scan.dcm" in r.path for r in recs)
    assert any(str(bad) in m and "skipped" in m for m in logs)
    assert find_sources(cmu_svs) == ([cmu_svs], [])  # a single file


def test_patch_set_progress_and_cancel(cmu_svs, image_tree):
    seen = []
    build_patch_set([cmu_svs, image_tree], mpp=1.0, patch_px=64, progress=lambda *a: seen.append(a))
    assert seen[0] == ("patches", 0, 1) and seen[-1] == ("patches", 1, 1)

    def cancel(stage, done, total):
        raise Cancelled

    ds = PatchDataset(build_patch_set([image_tree]), 16)
    with pytest.raises(Cancelled):
        ds.preload(progress=cancel)
    assert ds.preloaded is None and len(ds) == 5  # untouched
    assert ds[0].shape == (3, 16, 16)  # and still readable lazily


def test_slide_cache_survives_pickling_into_workers(cmu_svs):
    recs = build_patch_set([cmu_svs], mpp=1.0, patch_px=32, max_per_slide=4)
    ds = PatchDataset(recs, 32)
    first = ds[0]
    assert len(ds._slides) == 1  # opened once, kept open
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone._slides) == 0 and torch.equal(clone[0], first)
