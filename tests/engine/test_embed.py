"""engine.embed (the map), engine.knn, engine.tile_map, engine.tile_mosaic and engine.lasso,
on real stores: the sample slide encoded by the sample encoder, and a two-slide store of random
features over the CMU slide's real grid.

The ink figure of the map issue (2-D nearest-neighbour purity of the ink tiles on the map
against a random layout) is printed by::

    .venv/bin/python -m pytest tests/engine/test_embed.py -k ink -s -q -p no:cacheprovider
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.curation import Curation
from engine.embed import MOSAIC_FILE, EmbedConfig, Pca, main, run, stratified_sample
from engine.knn import CellIndex
from engine.lasso import apply_lasso, inside_polygon, lasso_tiles
from engine.progress import Cancelled
from engine.slide import open_slide
from engine.store import FeatureStore
from engine.tile_map import TileMap
from engine.tile_mosaic import mosaic_grid
from tests.engine.clustering_fixtures import copy_store, real_store, synthetic_store
from tests.engine.test_curation import (
    BLUE_INK,
    CMU,
    GREEN_INK,
    SAMPLE,
    SAMPLE_ENCODER,
    SAMPLE_MASK,
    cluster,
    needs_sample,
    tile_truth,
)

try:
    import umap  # noqa: F401

    HAVE_UMAP = True
except ImportError:
    HAVE_UMAP = False
needs_umap = pytest.mark.skipif(not HAVE_UMAP, reason="umap-learn not installed")
needs_cmu = pytest.mark.skipif(not CMU.exists(), reason="shared CMU slide absent")


@pytest.fixture(scope="module")
def sample_map(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The sample slide's store (sample encoder) with run k8, and its maps {method: EmbedResult}."""
    if not (SAMPLE.exists() and SAMPLE_MASK.exists() and SAMPLE_ENCODER.exists()):
        pytest.skip("sample_data/ absent")
    src = real_store(SAMPLE, tmp_path_factory, encoder=str(SAMPLE_ENCODER))
    path = copy_store(src, tmp_path_factory.mktemp("embed"))
    cluster(path, 8, "k8")
    methods = ["pca"] + (["umap"] if HAVE_UMAP else [])
    results = {m: run(EmbedConfig(store=path, run="k8", method=m, overwrite=True)) for m in methods}
    return path, results


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random features over the CMU grid under slide ids a and b, clustered into run k4."""
    if not CMU.exists():
        pytest.skip("shared CMU slide absent")
    path = synthetic_store(
        CMU, tmp_path_factory.mktemp("embed2") / "features.zarr", dim=16, ids=("a", "b")
    )
    cluster(path, 4, "k4")
    return path


# ----------------------------------------------------------------------------- pieces


def test_stratified_sample_gives_equal_shares_and_all_of_small_strata() -> None:
    strata = np.repeat([0, 1, 2], [5, 100, 300])
    pick = stratified_sample(strata, 105, seed=0)
    assert len(pick) == 105 and len(np.unique(pick)) == 105
    counts = np.bincount(strata[pick], minlength=3)
    assert counts.tolist() == [5, 50, 50]  # 5 all, then the other 100 split evenly
    np.testing.assert_array_equal(pick, stratified_sample(strata, 105, seed=0))
    assert not np.array_equal(pick, stratified_sample(strata, 105, seed=1))
    assert len(stratified_sample(strata, 10_000, 0)) == len(strata)


def test_pca_matches_svd_up_to_sign_and_is_sign_fixed() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    pca = Pca.fit(x, 3)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    for a, b in zip(pca.components, vt[:3], strict=True):
        assert abs(abs(a @ b) - 1) < 1e-8
        assert a[np.argmax(np.abs(a))] > 0
    assert pca(x).shape == (200, 3)


def test_cell_index_finds_itself_first_and_most_true_neighbours() -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((10, 8)) * 4
    x = (centres[rng.integers(0, 10, 6000)] + rng.standard_normal((6000, 8))).astype(np.float32)
    index = CellIndex(x, seed=0)
    assert index.cells > 1
    idx, dist = index.neighbor_graph(10)
    assert (idx[:, 0] == np.arange(len(x))).all() and (dist[:, 0] == 0).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    exact, exact_d = CellIndex(x, cells=1).query(x[:300], 10)
    d_full = np.sqrt(((x[:300, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(exact_d, np.sort(d_full, 1)[:, :10], rtol=1e-4, atol=1e-4)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx[:300], exact, strict=True)])
    print(f"\nCellIndex recall@10 on 6000 points in 8-d (probe 8 of {index.cells}): {recall:.3f}")
    assert recall > 0.8


def test_inside_polygon_agrees_with_matplotlib_and_a_hand_case() -> None:
    from matplotlib.path import Path as MplPath

    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2]])
    pts = np.array([[1, 1], [3, 1], [-0.1, 1], [1.9, 1.9], [1, 2.5]])
    assert inside_polygon(pts, square).tolist() == [True, False, False, True, False]
    rng = np.random.default_rng(1)
    for _ in range(5):
        angle = np.sort(rng.uniform(0, 2 * np.pi, 9))
        poly = np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(0.3, 1.5, (9, 1))
        points = rng.uniform(-1.6, 1.6, (4000, 2))
        ref = MplPath(poly).contains_points(points)
        assert (inside_polygon(points, poly) == ref).mean() > 0.999  # boundary ties only
    assert not inside_polygon(pts, square[:2]).any()  # fewer than 3 vertices: nothing


# ----------------------------------------------------------------------------- the map


@needs_sample
def test_every_tissue_tile_gets_coordinates(sample_map) -> None:
    path, results = sample_map
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    labels = store.read_cluster_labels("k8", sid)
    xy = store.read_embedding("k8")[sid]
    for method, result in results.items():
        assert result.n_tiles == int((labels >= 0).sum()) == len(result.tile_map), method
    np.testing.assert_array_equal(np.isfinite(xy).all(-1), labels >= 0)
    assert store.embedding_attrs("k8")["complete"] is True
    tm = TileMap.from_store(store, "k8")
    i = len(tm) // 2
    assert tm.index_of(*tm.tile(i)) == i
    assert tm.nearest(*tm.xy[i]) == i or np.allclose(tm.xy[tm.nearest(*tm.xy[i])], tm.xy[i])


@needs_sample
@pytest.mark.parametrize("method", ["pca", pytest.param("umap", marks=needs_umap)])
def test_the_map_is_deterministic(sample_map, method: str, tmp_path: Path) -> None:
    path, results = sample_map
    again = copy_store(path, tmp_path)
    second = run(EmbedConfig(store=again, run="k8", method=method, overwrite=True, grid=0))
    np.testing.assert_array_equal(second.tile_map.xy, results[method].tile_map.xy)
    other = run(EmbedConfig(store=again, run="k8", method=method, seed=1, overwrite=True, grid=0))
    if method == "umap":
        assert not np.array_equal(other.tile_map.xy, second.tile_map.xy)


@needs_sample
def test_a_finished_map_is_reused_and_replaced_when_the_run_changes(sample_map, tmp_path) -> None:
    path, _ = sample_map
    mine = copy_store(path, tmp_path)
    first = run(EmbedConfig(store=mine, run="k8", method="pca", grid=0))
    again = run(EmbedConfig(store=mine, run="k8", method="pca", grid=0))
    assert again.reused and np.array_equal(again.tile_map.xy, first.tile_map.xy)
    created = FeatureStore.open(mine).embedding_attrs("k8")["run_created"]
    cluster(mine, 8, "k8", 3, "--overwrite")  # same name, new run
    third = run(EmbedConfig(store=mine, run="k8", method="pca", grid=0))
    attrs = FeatureStore.open(mine).embedding_attrs("k8")
    assert not third.reused and attrs["run_created"] != created and attrs["complete"]


@needs_cmu
@needs_umap
def test_an_interrupted_map_resumes_to_the_same_coordinates(two_slides: Path, tmp_path) -> None:
    cfg = dict(run="k4", method="umap", sample=800, grid=0)
    whole = run(EmbedConfig(store=copy_store(two_slides, tmp_path / "w"), **cfg))
    part = copy_store(two_slides, tmp_path / "p")
    n_a = int((FeatureStore.open(part).read_cluster_labels("k4", "a") >= 0).sum())

    def stop_after_a(stage: str, done: int, total: int) -> None:
        if stage == "transform" and done > n_a:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(EmbedConfig(store=part, **cfg), progress=stop_after_a)
    attrs = FeatureStore.open(part).embedding_attrs("k4")
    assert attrs["slides_done"] == ["a"] and attrs["complete"] is False
    resumed = run(EmbedConfig(store=part, **cfg))
    assert resumed.resumed == ["a"] and not resumed.reused
    np.testing.assert_array_equal(resumed.tile_map.xy, whole.tile_map.xy)
    assert whole.n_sample == 800 and len(whole.tile_map) > 800


@needs_sample
def test_mosaic_cells_show_tiles_of_that_cell(sample_map) -> None:
    path, results = sample_map
    store = FeatureStore.open(path)
    tm = results["pca"].tile_map if "umap" not in results else results["umap"].tile_map
    grid = mosaic_grid(tm, 16)
    assert grid.counts.sum() == len(tm)
    row, col = grid.cell_of(tm.xy)
    for r, c in zip(*np.nonzero(grid.counts), strict=True):
        members = np.flatnonzero((row == r) & (col == c))
        assert len(members) == grid.counts[r, c]
        chosen = grid.chosen[r, c]
        assert chosen in members  # the thumbnail is a tile of that cell
        cx, cy = grid.centre(r, c)
        d = np.hypot(tm.xy[members, 0] - cx, tm.xy[members, 1] - cy)
        assert np.hypot(tm.xy[chosen, 0] - cx, tm.xy[chosen, 1] - cy) == d.min()
        assert grid.cluster[r, c] == np.bincount(tm.labels[members]).argmax()
    assert (grid.chosen[grid.counts == 0] == -1).all()
    px = grid.to_pixels(tm.xy, 32)
    np.testing.assert_allclose(grid.to_map(px, 32), tm.xy, rtol=1e-6, atol=1e-6)
    # The written mosaic (64 x 64 cells of 32 px) holds the chosen tile's pixels in each cell.
    big = mosaic_grid(tm, 64)
    image = np.asarray(Image.open(store.run_file("k8", MOSAIC_FILE)))
    assert image.shape == (64 * 32, 64 * 32, 3)
    sid = tm.slide_ids[0]
    sf = store.slide(sid)
    with open_slide(sf.source_path) as slide:
        for r, c in list(zip(*np.nonzero(big.chosen >= 0), strict=True))[:5]:
            _, tr, tc = tm.tile(big.chosen[r, c])
            tile = slide.read_tile_at_mpp(
                tuple(int(v) for v in sf.origins[tr, tc]),
                store.tiling.target_mpp,
                store.tiling.tile_px,
            )
            want = np.asarray(Image.fromarray(tile).resize((32, 32), Image.Resampling.BOX))
            np.testing.assert_array_equal(image[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32], want)
    assert (image[np.repeat(np.repeat(big.counts == 0, 32, 0), 32, 1)] == 255).all()


@needs_sample
def test_lasso_selects_exactly_the_tiles_inside_and_overrides_them(sample_map) -> None:
    path, results = sample_map
    store = FeatureStore.open(path)
    tm = next(iter(results.values())).tile_map
    x0, y0, x1, y1 = tm.bounds
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    poly = np.array([[x0 - 1, y0 - 1], [mx, y0 - 1], [mx, my], [x0 - 1, my]])  # a corner box
    want = {tm.tile(i) for i in range(len(tm)) if tm.xy[i, 0] < mx and tm.xy[i, 1] < my}
    got = {
        (sid, int(r), int(c))
        for sid, (rs, cs) in lasso_tiles(tm, poly).items()
        for r, c in zip(rs, cs, strict=True)
    }
    assert got == want and 0 < len(got) < len(tm)
    cur = Curation.for_run(store, "k8")
    assert apply_lasso(cur, tm, poly, "lassoed") == len(want)
    labels = store.read_cluster_labels("k8", tm.slide_ids[0])
    for sid, r, c in want:
        assert cur.class_of(sid, r, c, int(labels[r, c])) == "lassoed"
    outside = next(tm.tile(i) for i in range(len(tm)) if tm.tile(i) not in want)
    assert cur.class_of(*outside, int(labels[outside[1], outside[2]])) is None


@needs_sample
def test_the_ink_tiles_lie_together_on_the_map(sample_map) -> None:
    path, results = sample_map
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    truth = tile_truth(store, sid, SAMPLE_MASK)
    k = 5
    print()
    for method, result in results.items():
        tm = result.tile_map
        t = truth[tm.rows, tm.cols]
        for name, ink in (("green ink", GREEN_INK), ("blue ink", BLUE_INK)):
            is_ink = t == ink
            if is_ink.sum() < k + 1:
                continue
            purity = _knn_purity(tm.xy, is_ink, k)
            rng = np.random.default_rng(0)
            shuffled = np.mean(
                [_knn_purity(tm.xy[rng.permutation(len(tm))], is_ink, k) for _ in range(20)]
            )
            print(
                f"{method}: {name}: {int(is_ink.sum())} of {len(tm)} tiles, 2-D {k}-NN purity "
                f"{purity:.3f} vs random layout {shuffled:.3f}"
            )
            assert purity > shuffled + 0.3


def _knn_purity(xy: np.ndarray, mask: np.ndarray, k: int) -> float:
    """Mean share of each masked tile's k nearest map neighbours (itself excluded) also masked."""
    d = np.hypot(xy[mask, None, 0] - xy[None, :, 0], xy[mask, None, 1] - xy[None, :, 1])
    d[np.arange(mask.sum()), np.flatnonzero(mask)] = np.inf
    nn = np.argsort(d, axis=1, kind="stable")[:, :k]
    return float(mask[nn].mean())


# ----------------------------------------------------------------------------- the command


@needs_sample
def test_command_exit_statuses(sample_map, tmp_path: Path, capsys) -> None:
    path, _ = sample_map
    mine = copy_store(path, tmp_path)
    assert main([str(mine), "--run", "k8", "--method", "pca", "--grid", "8"]) == 0
    out = capsys.readouterr().out
    assert "map of cluster run 'k8'" in out and "mosaic.png" in out
    assert main([str(mine), "--run", "k8", "--grid", "-1"]) == 2
    assert "--grid must be at least 0" in capsys.readouterr().err
    assert main([str(mine), "--run", "nope", "--quiet"]) == 2
    assert "no cluster run 'nope'" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.zarr")]) == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--method" in capsys.readouterr().out


@needs_umap
def test_membership_weights_match_umaps_transform_weights() -> None:
    from umap.umap_ import compute_membership_strengths, smooth_knn_dist

    from engine.embed import membership_weights

    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0.5, 3, (50, 15)).astype(np.float32), 1)
    d[0, :3] = 0  # duplicates of a sample tile
    idx = np.tile(np.arange(100, 115), (50, 1)).astype(np.int32)
    sigma, rho = smooth_knn_dist(d, 15.0, local_connectivity=0.0)  # as UMAP.transform calls it
    _, _, ref, _ = compute_membership_strengths(idx, d, sigma, rho, bipartite=True)
    np.testing.assert_allclose(membership_weights(d), ref.reshape(50, 15), atol=1e-5)
