"""FeatureStore: layout per ARCHITECTURE.md, compatibility checks, tile writes, iteration, cluster runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError
from engine.slide import open_slide
from engine.store import CHUNK, FeatureStore, file_fingerprint
from engine.tiling import TileGrid

DIM = 8
ENCODER = EncoderId(
    name="resnet18-random",
    arch="resnet18",
    dim=DIM,
    input_px=224,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)


@pytest.fixture(scope="module")
def cmu_grid(cmu_svs: Path) -> TileGrid:
    """The real CMU slide at 32 px / 0.5 um: 93 x 70 tiles, so 3 x 3 chunks."""
    slide = open_slide(cmu_svs)
    grid = TileGrid(slide, target_mpp=0.5, tile_px=32)
    grid.tissue  # noqa: B018 - compute once for the module
    return grid


def _png_slide(tmp_path: Path, name: str = "synthetic.png", seed: int = 0) -> Path:
    """A 300 x 200 px image: a pink disc of 'tissue' on white."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:200, :300]
    rgb = np.full((200, 300, 3), 245, np.uint8)
    disc = (xx - 150) ** 2 + (yy - 100) ** 2 < 80**2
    rgb[disc] = (200, 80, 150)
    rgb = np.clip(rgb.astype(int) + rng.integers(-5, 6, rgb.shape), 0, 255).astype(np.uint8)
    path = tmp_path / name
    Image.fromarray(rgb).save(path)
    return path


def test_layout_matches_architecture(tmp_path: Path, cmu_grid: TileGrid) -> None:
    store = FeatureStore.create_or_open(tmp_path / "f.zarr", ENCODER, cmu_grid.tiling)
    sf = store.add_slide("cmu", cmu_grid)
    rows, cols = cmu_grid.shape
    assert rows > CHUNK and cols > CHUNK

    root = zarr.open_group(str(tmp_path / "f.zarr"), mode="r")
    assert root.metadata.zarr_format == 3
    assert root.attrs["format_version"] == 1
    assert root.attrs["encoder"]["mean"] == list(ENCODER.mean)
    assert root.attrs["tiling"] == {
        "tile_px": 32,
        "stride_px": 32,
        "target_mpp": 0.5,
        "tissue_method": "otsu",
        "min_tissue": 0.5,
    }
    g = root["slides/cmu"]
    assert g["features"].shape == (rows, cols, DIM) and g["features"].dtype == np.float16
    assert g["features"].chunks == (CHUNK, CHUNK, DIM)
    assert g["tissue"].dtype == np.float16 and g["tissue"].shape == (rows, cols)
    assert g["done"].dtype == np.bool_ and g["done"].chunks == (CHUNK, CHUNK)
    assert not np.asarray(g["done"][...]).any()
    np.testing.assert_array_equal(g["origins"][...], cmu_grid.origins)
    np.testing.assert_allclose(g["tissue"][...], cmu_grid.tissue, atol=1e-3)

    attrs = sf.attrs
    assert attrs["source_path"] == str(cmu_grid.slide.path.resolve())
    assert attrs["size"] == cmu_grid.slide.path.stat().st_size
    assert attrs["fingerprint"] == file_fingerprint(cmu_grid.slide.path)
    assert attrs["mpp"] == pytest.approx(list(cmu_grid.slide.mpp))
    assert (attrs["rows"], attrs["cols"], attrs["level"]) == (rows, cols, 0)
    assert attrs["grid_origin_l0"] == [0, 0]
    assert attrs["dimensions"] == [2220, 2967]
    assert sf.source_path == cmu_grid.slide.path.resolve()
    # selection follows the stored float16 tissue, the rule every reader uses
    assert np.array_equal(sf.selected, np.asarray(g["tissue"][...]).astype(np.float32) >= 0.5)
    assert 0 < sf.selected.sum() < rows * cols
    assert store.slide_ids() == ["cmu"] and "cmu" in store


def test_refuses_other_encoder_or_tiling_unless_overwrite(
    tmp_path: Path, cmu_grid: TileGrid
) -> None:
    path = tmp_path / "f.zarr"
    store = FeatureStore.create_or_open(path, ENCODER, cmu_grid.tiling)
    store.add_slide("cmu", cmu_grid)
    # the same encoder and tiling reopen, keeping the slide
    assert FeatureStore.create_or_open(path, ENCODER, cmu_grid.tiling).slide_ids() == ["cmu"]

    with pytest.raises(HistoclusterError, match="resnet18-random.*resnet34-random.*--overwrite"):
        FeatureStore.create_or_open(
            path, replace(ENCODER, name="resnet34-random", arch="resnet34"), cmu_grid.tiling
        )
    with pytest.raises(HistoclusterError, match="--overwrite"):
        FeatureStore.create_or_open(path, replace(ENCODER, sha256="ab" * 32), cmu_grid.tiling)
    with pytest.raises(HistoclusterError, match="tile_px=32 vs 64"):
        FeatureStore.create_or_open(
            path, ENCODER, replace(cmu_grid.tiling, tile_px=64, stride_px=64)
        )
    with pytest.raises(HistoclusterError, match="min_tissue"):
        FeatureStore.create_or_open(path, ENCODER, replace(cmu_grid.tiling, min_tissue=0.25))

    fresh = FeatureStore.create_or_open(
        path, ENCODER, replace(cmu_grid.tiling, tile_px=64, stride_px=64), overwrite=True
    )
    assert fresh.slide_ids() == [] and fresh.tiling.tile_px == 64


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(
    tmp_path: Path, cmu_grid: TileGrid
) -> None:
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "thesis.txt").write_text("keep me")
    with pytest.raises(HistoclusterError, match="not a histocluster feature store"):
        FeatureStore.create_or_open(folder, ENCODER, cmu_grid.tiling, overwrite=True)
    assert (folder / "thesis.txt").read_text() == "keep me"
    with pytest.raises(HistoclusterError, match="not a histocluster feature store"):
        FeatureStore.create_or_open(folder, ENCODER, cmu_grid.tiling)


def test_open_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(HistoclusterError, match="no feature store there.*engine.extract") as e:
        FeatureStore.open(tmp_path / "missing.zarr")
    assert "\n" not in str(e.value)
    zarr.create_group(str(tmp_path / "other.zarr"), attributes={"hello": 1})
    with pytest.raises(HistoclusterError, match="not a histocluster feature store"):
        FeatureStore.open(tmp_path / "other.zarr")


def test_write_tiles_and_iterate_tissue_features(tmp_path: Path, cmu_grid: TileGrid) -> None:
    store = FeatureStore.create_or_open(tmp_path / "f.zarr", ENCODER, cmu_grid.tiling)
    sf = store.add_slide("cmu", cmu_grid)
    rows, cols = np.nonzero(sf.selected)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    half = order[: len(order) // 2]  # scattered over every chunk
    feats = rng.normal(size=(len(half), DIM)).astype(np.float32)
    sf.write_tiles(rows[half], cols[half], feats)

    done = np.asarray(sf.done[...])
    expected_done = np.zeros(sf.shape, bool)
    expected_done[rows[half], cols[half]] = True
    assert np.array_equal(done, expected_done)
    np.testing.assert_array_equal(
        sf.read_tiles(rows[half], cols[half]), feats.astype(np.float16).astype(np.float32)
    )
    assert np.array_equal(sf.pending(), sf.selected & ~expected_done)

    # a tile done but outside the tissue is not a tissue feature
    outside = np.argwhere(~sf.selected)[0]
    sf.write_tiles(outside[:1], outside[1:], np.ones((1, DIM)))

    batches = list(store.iter_tissue_features(max_tiles=500))
    assert len(batches) > 1
    assert all(b.slide_id == "cmu" and b.features.dtype == np.float32 for b in batches)
    assert all(len(b.rows) <= 500 + CHUNK * CHUNK for b in batches)
    got_r = np.concatenate([b.rows for b in batches])
    got_c = np.concatenate([b.cols for b in batches])
    got_f = np.concatenate([b.features for b in batches])
    assert len(got_r) == len(half) == store.n_tissue_tiles()
    lookup = {(int(r), int(c)): f for r, c, f in zip(rows[half], cols[half], feats, strict=True)}
    for r, c, f in zip(got_r, got_c, got_f, strict=True):
        np.testing.assert_array_equal(
            f, lookup[(int(r), int(c))].astype(np.float16).astype(np.float32)
        )


def test_write_block_replaces_a_whole_chunk_features_first(
    tmp_path: Path, cmu_grid: TileGrid
) -> None:
    store = FeatureStore.create_or_open(tmp_path / "f.zarr", ENCODER, cmu_grid.tiling)
    sf = store.add_slide("cmu", cmu_grid)
    blocks = sf.blocks()
    assert (
        blocks[0].shape == (CHUNK, CHUNK)
        and blocks[-1].r1 == sf.shape[0]
        and blocks[-1].c1 == sf.shape[1]
    )
    edge = blocks[-1]
    h, w = edge.shape
    feats = np.arange(h * w * DIM, dtype=np.float32).reshape(h, w, DIM) / 100
    done = np.zeros((h, w), bool)
    done[0, :3] = True
    sf.write_block(edge, feats, done)
    got_f, got_d = sf.read_block(edge)
    np.testing.assert_array_equal(got_f, feats.astype(np.float16))
    assert np.array_equal(got_d, done)
    with pytest.raises(ValueError, match="needs features"):
        sf.write_block(blocks[0], feats, done)


def test_add_slide_reuses_same_file_refuses_other_content(
    tmp_path: Path, cmu_grid: TileGrid
) -> None:
    png = _png_slide(tmp_path)
    grid = TileGrid(open_slide(png, mpp=0.5), target_mpp=0.5, tile_px=32)
    store = FeatureStore.create_or_open(tmp_path / "f.zarr", ENCODER, grid.tiling)
    sf = store.add_slide("synthetic", grid)
    r, c = np.nonzero(sf.selected)
    assert len(r) > 0
    sf.write_tiles(r[:2], c[:2], np.ones((2, DIM)))

    # the same file moved elsewhere: reused, done tiles kept, path updated
    moved = tmp_path / "moved" / "synthetic.png"
    moved.parent.mkdir()
    shutil.copy(png, moved)
    again = store.add_slide(
        "synthetic", TileGrid(open_slide(moved, mpp=0.5), target_mpp=0.5, tile_px=32)
    )
    assert np.asarray(again.done[...]).sum() == 2
    assert again.source_path == moved.resolve()

    # another image under the same id: refused with a clear message
    other = _png_slide(tmp_path / "moved", name="x.png", seed=1)
    other_grid = TileGrid(open_slide(other, mpp=0.5), target_mpp=0.5, tile_px=32)
    with pytest.raises(
        HistoclusterError, match="holds slide 'synthetic'.*fingerprint.*--overwrite"
    ):
        store.add_slide("synthetic", other_grid)


def test_incomplete_slide_group_is_invisible_and_rebuilt(tmp_path: Path) -> None:
    grid = TileGrid(open_slide(_png_slide(tmp_path), mpp=0.5), target_mpp=0.5, tile_px=32)
    store = FeatureStore.create_or_open(tmp_path / "f.zarr", ENCODER, grid.tiling)
    # what a writer killed inside add_slide leaves: arrays, no tissue, no complete flag
    half = store.root["slides"].create_group("synthetic")
    half.create_array("features", shape=(1, 1, DIM), dtype="float16")
    assert store.slide_ids() == []
    with pytest.raises(HistoclusterError, match="no slide 'synthetic'"):
        store.slide("synthetic")
    sf = store.add_slide("synthetic", grid)
    assert sf.shape == grid.shape and store.slide_ids() == ["synthetic"]


def test_cluster_runs_round_trip(tmp_path: Path) -> None:
    grid = TileGrid(open_slide(_png_slide(tmp_path), mpp=0.5), target_mpp=0.5, tile_px=32)
    store = FeatureStore.create_or_open(tmp_path / "f.zarr", ENCODER, grid.tiling)
    sf = store.add_slide("synthetic", grid)
    assert store.cluster_runs() == [] and store.latest_cluster_run() is None

    labels = np.where(sf.selected, np.arange(sf.shape[0] * sf.shape[1]).reshape(sf.shape) % 3, -1)
    centroids = np.random.default_rng(0).normal(size=(3, DIM))
    store.write_cluster_run(
        "k3", centroids, {"synthetic": labels}, {"algorithm": "kmeans", "seed": 0, "n_fit_tiles": 5}
    )
    store.write_cluster_run(
        "k2", centroids[:2], {"synthetic": np.minimum(labels, 1)}, {"algorithm": "kmeans"}
    )
    assert store.cluster_runs() == ["k3", "k2"] and store.latest_cluster_run() == "k2"

    reopened = FeatureStore.open(tmp_path / "f.zarr")
    attrs, cents, labs = reopened.read_cluster_run("k3")
    assert attrs["k"] == 3 and attrs["algorithm"] == "kmeans" and attrs["slides"] == ["synthetic"]
    assert cents.dtype == np.float32
    np.testing.assert_allclose(cents, centroids.astype(np.float32))
    assert labs["synthetic"].dtype == np.int16
    np.testing.assert_array_equal(labs["synthetic"], labels)
    np.testing.assert_array_equal(
        reopened.read_cluster_labels("k2", "synthetic"), np.minimum(labels, 1)
    )
    json.dumps(attrs)

    with pytest.raises(HistoclusterError, match="exists"):
        store.write_cluster_run("k3", centroids, {"synthetic": labels}, {})
    store.write_cluster_run("k3", centroids, {"synthetic": labels}, {"seed": 1}, overwrite=True)
    assert store.read_cluster_run("k3").attrs["seed"] == 1
    with pytest.raises(ValueError, match="must be"):
        store.write_cluster_run("bad", centroids, {"synthetic": labels[:1]}, {})
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        store.write_cluster_run("bad", centroids[:2], {"synthetic": labels}, {})
    with pytest.raises(HistoclusterError, match="no cluster run 'nope'"):
        store.read_cluster_run("nope")
    read_only = FeatureStore.open(tmp_path / "f.zarr", mode="r").slide("synthetic")
    with pytest.raises(ValueError, match="read-only"):
        read_only.write_tiles(np.array([0]), np.array([0]), np.zeros((1, read_only.dim)))
