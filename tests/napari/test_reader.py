"""The npe2 reader: lazy multiscale slide layers in micrometres; None for what it cannot read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from engine.slide import SLIDE_SUFFIXES, open_slide
from engine.tiling import Tiling
from histocluster_napari._reader import napari_get_reader
from histocluster_napari._session import ClusterJob, cluster
from histocluster_napari._slide_layers import METADATA_KEY, slide_pyramid
from tests.conftest import REPO
from tests.napari.conftest import FAST


def test_reader_opens_cmu_svs_as_multiscale_layer_in_um(make_napari_viewer, cmu_svs: Path) -> None:
    viewer = make_napari_viewer()
    layers = viewer.open(str(cmu_svs), plugin="histocluster")
    assert len(layers) == 1
    layer = layers[0]
    assert layer.multiscale and layer.rgb
    np.testing.assert_allclose(layer.scale, (0.499, 0.499), rtol=1e-6)
    assert layer.data[0].shape == (2967, 2220, 3)
    assert layer.metadata[METADATA_KEY]["mpp_known"] is True
    # The world extent is the slide's physical size.
    extent = layer.extent.world[1] - layer.extent.world[0]
    np.testing.assert_allclose(extent, (2967 * 0.499, 2220 * 0.499), rtol=1e-3)


def test_pyramid_chunks_follow_slide_tiles_and_read_the_right_pixels(pyramidal_tiff: Path) -> None:
    with open_slide(pyramidal_tiff) as slide:
        pyramid = slide_pyramid(slide)
        assert [p.shape[:2] for p in pyramid] == [(h, w) for (w, h) in slide.level_dimensions]
        for level in pyramid:
            ch, cw = level.chunksize[:2]
            assert ch % 256 == 0 and cw % 256 == 0  # whole tiles of the TIFF (256 px)
            assert level.numblocks[0] * level.numblocks[1] > 1 or level.shape[0] <= ch
        # Level 0 across chunk borders: exactly the pixels of one read_region call.
        got = np.asarray(pyramid[0][300:700, 400:950])
        np.testing.assert_array_equal(got, slide.read_region((400, 300), 0, (550, 400)))
        # A coarser level (within a chunk: OpenSlide interpolates sub-pixel level-0 offsets).
        got = np.asarray(pyramid[1][0:400, 0:500])
        np.testing.assert_array_equal(got, slide.read_region((0, 0), 1, (500, 400)))


def test_pyramid_never_reads_a_whole_level(cmu_svs: Path) -> None:
    """Each chunk is one read_region call of at most one chunk's pixels."""
    sizes: list[tuple[int, int]] = []
    with open_slide(cmu_svs) as slide:
        read = slide.read_region

        def recording(l0_xy, level, size):  # the real reader, recording what it is asked
            sizes.append(tuple(size))
            return read(l0_xy, level, size)

        slide.read_region = recording  # type: ignore[method-assign]
        level0 = slide_pyramid(slide)[0]
        ch, cw = level0.chunksize[:2]
        assert (ch, cw) == (480, 480)  # the SVS's 240 px tiles, two per chunk side
        patch = np.asarray(level0[1000:1100, 1000:1500])
    assert patch.shape == (100, 500, 3)
    assert 0 < len(sizes) <= 4 and all(w <= cw and h <= ch for w, h in sizes)


def test_synthetic_levels_for_big_single_level_images(tmp_path: Path) -> None:
    from engine.slide import ArraySlide

    block = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    rgb = np.tile(block, (90, 50, 1))
    slide = ArraySlide(rgb, mpp=0.25)
    pyramid = slide_pyramid(slide)
    assert [p.shape[:2] for p in pyramid] == [(9000, 5000), (4500, 2500), (2250, 1250)]
    np.testing.assert_allclose(  # 4x4 box averages of the full-resolution pixels
        np.asarray(pyramid[2][10:12, 20:22]),
        rgb[40:48, 80:88].reshape(2, 4, 2, 4, 3).mean(axis=(1, 3)),
        atol=1,
    )


@pytest.mark.parametrize("name", ["notes.svs", "notes.tiff", "notes.txt", "missing.svs"])
def test_reader_returns_none_for_what_it_cannot_read(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if not name.startswith("missing"):
        path.write_text("this is not a slide\n")
    assert napari_get_reader(str(path)) is None


def test_reader_returns_none_for_a_truncated_slide(tmp_path: Path, cmu_svs: Path) -> None:
    cut = tmp_path / "cut.svs"
    cut.write_bytes(cmu_svs.read_bytes()[:500_000])
    assert napari_get_reader(str(cut)) is None


def test_slide_without_mpp_opens_in_pixels_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "nompp.tiff"
    rgb = np.full((512, 768, 3), 200, np.uint8)
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb")
    reader = napari_get_reader(str(path))
    assert reader is not None
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image" and kwargs["multiscale"]
    assert kwargs["metadata"][METADATA_KEY]["mpp_known"] is False
    assert data[0].shape == (512, 768, 3)


def test_reader_opens_a_feature_store_with_its_latest_clusters(
    make_napari_viewer, sample_slide: Path, tmp_path: Path
) -> None:
    store = tmp_path / "features.zarr"
    tiling = Tiling(tile_px=FAST["tile_px"], target_mpp=FAST["target_mpp"])
    job = ClusterJob((sample_slide,), None, FAST["encoder"], tiling, FAST["k"], store)
    view = cluster(job)
    viewer = make_napari_viewer()
    layers = viewer.open(str(store), plugin="histocluster")
    assert [type(layer).__name__ for layer in layers] == ["Image", "Labels"]
    image, labels = layers
    assert image.multiscale and image.name == "sample_slide"
    sid = "sample_slide"
    np.testing.assert_array_equal(np.asarray(labels.data), view.labels[sid].astype(int) + 1)
    np.testing.assert_allclose(labels.scale, view.geometry[sid].scale)
    np.testing.assert_allclose(labels.translate, view.geometry[sid].translate)


def test_reader_returns_none_for_a_zarr_that_is_not_a_feature_store(tmp_path: Path) -> None:
    import zarr

    path = tmp_path / "other.zarr"
    zarr.create_group(store=str(path), attributes={"format": "something else"})
    assert napari_get_reader(str(path)) is None
    assert napari_get_reader(str(tmp_path / "missing.zarr")) is None


def test_manifest_reader_patterns_are_the_engine_slide_suffixes() -> None:
    import yaml

    manifest = yaml.safe_load((REPO / "histocluster_napari" / "napari.yaml").read_text())
    [reader] = manifest["contributions"]["readers"]
    patterns = reader["filename_patterns"]
    assert sorted(patterns) == sorted(f"*{s}" for s in (*SLIDE_SUFFIXES, ".zarr"))
