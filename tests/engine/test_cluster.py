"""engine.kmeans (streamed mini-batch K-means) and python -m engine.cluster on real slides."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.cluster import main as cluster_main
from engine.encoder_id import EncoderId
from engine.kmeans import (
    KMeansSettings,
    MiniBatchKMeans,
    _choose,
    _select,
    assign,
    fit_kmeans,
    fit_streamed_kmeans,
    l2_normalize,
    row_norms2,
)
from engine.store import FeatureStore
from tests.engine.clustering_fixtures import copy_store, real_store, synthetic_store

REPO = Path(__file__).resolve().parents[2]


def _chunks(x: np.ndarray, rows: int):
    return lambda: (x[s : s + rows] for s in range(0, len(x), rows))


def _blobs(
    n: int = 3000, k: int = 4, dim: int = 16, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)) * 10
    truth = rng.integers(0, k, n)
    return (centers[truth] + rng.standard_normal((n, dim))).astype(np.float32), truth


# ----------------------------------------------------------------------------- engine.kmeans


def test_minibatch_step_matches_sklearn() -> None:
    from sklearn.cluster import MiniBatchKMeans as SkMiniBatch

    x, _ = _blobs(4096, k=5)
    init = x[:5].copy()
    ours = MiniBatchKMeans(init, reassignment_ratio=0.0)
    ref = SkMiniBatch(
        5, init=init, n_init=1, batch_size=512, reassignment_ratio=0.0, compute_labels=False
    )
    for s in range(0, len(x), 512):
        ours.partial_fit(x[s : s + 512])
        ref.partial_fit(x[s : s + 512])
    np.testing.assert_allclose(ours.centers, ref.cluster_centers_, rtol=1e-4, atol=1e-4)


def test_reassignment_moves_an_empty_centre_onto_data() -> None:
    x, _ = _blobs(2048, k=2)
    far = np.vstack([x[:1], np.full((1, x.shape[1]), 1e4, np.float32)])
    model = MiniBatchKMeans(far, seed=0, reassignment_ratio=0.01)
    model.partial_fit(x)
    assert np.abs(model.centers[1]).max() < 100  # moved from 1e4 onto a data point


def test_streamed_fit_recovers_a_mixture_and_assign_is_exact() -> None:
    from sklearn.metrics import adjusted_rand_score

    x, truth = _blobs(6000, k=4)
    fit = fit_streamed_kmeans(
        _chunks(x, 700), KMeansSettings(4, seed=0, batch_size=256, buffer_rows=1500)
    )
    labels, dist = assign(x, fit.centroids)
    assert adjusted_rand_score(truth, labels) > 0.99
    d = np.linalg.norm(x[:, None, :] - fit.centroids[None], axis=2)
    np.testing.assert_array_equal(labels, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-5, atol=1e-4)
    assert fit.n_total == 6000 and fit.n_fit == 6000


def test_streamed_fit_is_deterministic_and_respects_sample() -> None:
    x, _ = _blobs(5000, k=6, seed=1)
    settings = KMeansSettings(6, sample=1200, seed=7, batch_size=128)
    a = fit_streamed_kmeans(_chunks(x, 333), settings)
    b = fit_streamed_kmeans(_chunks(x, 333), settings)
    c = fit_streamed_kmeans(_chunks(x, 333), replace(settings, seed=8))
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert not np.array_equal(a.centroids, c.centroids)
    assert a.n_fit == 1200 and a.n_total == 5000


def test_cache_does_not_change_the_result_and_refinement_reaches_a_lloyd_fixed_point() -> None:
    x, _ = _blobs(4000, k=5, seed=2)
    x[:, 0] += np.linspace(0, 3, len(x), dtype=np.float32)  # overlapping, so refinement matters
    settings = KMeansSettings(5, sample=2500, seed=4, batch_size=200, refine_passes=50, tol=0.0)
    cached = fit_streamed_kmeans(_chunks(x, 300), settings)
    streamed = fit_streamed_kmeans(_chunks(x, 300), settings, cache_bytes=0)
    in_memory = fit_kmeans(x, settings)
    norms = np.concatenate([row_norms2(x[s : s + 300]) for s in range(0, len(x), 300)])
    with_norms = fit_kmeans(x, settings, sq=norms)  # held per chunk, as ClusterFeatures does
    np.testing.assert_array_equal(cached.centroids, streamed.centroids)
    np.testing.assert_array_equal(cached.centroids, in_memory.centroids)
    np.testing.assert_array_equal(cached.centroids, with_norms.centroids)
    # a Lloyd fixed point on the fitting rows: each centre is the mean of the rows nearest it
    chosen = _choose(np.random.default_rng(4), len(x), 2500)
    rows = x[chosen]
    labels, _ = assign(rows, cached.centroids)
    means = np.stack([rows[labels == c].mean(0) for c in range(5)])
    np.testing.assert_allclose(cached.centroids, means, rtol=1e-4, atol=1e-4)
    assert cached.passes > 3


def test_lloyd_bounds_skip_rows_without_changing_the_centres(monkeypatch) -> None:
    """Rows whose distance bounds prove their label are not recomputed, and that changes
    nothing: the same centres, bit for bit, as recomputing every row in every pass."""
    from engine import kmeans

    x, _ = _blobs(10_000, k=3, dim=16, seed=3)  # 8 centres over 3 blobs: boundaries in blobs
    x = l2_normalize(x)
    start = x[:: len(x) // 8][:8].copy()
    for _ in range(10):  # near a fixed point, as after the mini-batch passes
        labels, _ = assign(x, start)
        start = np.stack([x[labels == c].mean(0) for c in range(8)])
    recomputed: list[int] = []
    two_nearest, widen = kmeans._two_nearest, kmeans._widen

    def counting(rows, sq, centers):
        recomputed.append(len(rows))
        return two_nearest(rows, sq, centers)

    monkeypatch.setattr(kmeans, "_two_nearest", counting)
    plan = kmeans._Plan.make(KMeansSettings(8, max_passes=0, refine_passes=8, tol=0.0), len(x))
    blocks = lambda size: (x[s : s + size] for s in range(0, len(x), size))  # noqa: E731
    bounded, passes, _ = kmeans._lloyd_passes(plan, start, blocks, 1.0, lambda *a: None)
    assert passes == 8 and sum(recomputed[:3]) == len(x)  # the first pass: every row
    assert sum(recomputed[3:]) < 0.5 * (passes - 1) * len(x)  # later ones: fewer rows
    monkeypatch.setattr(kmeans, "_widen", lambda *a: np.ones(len(x), bool) | widen(*a))
    before = len(recomputed)
    every, _, _ = kmeans._lloyd_passes(plan, start, blocks, 1.0, lambda *a: None)
    np.testing.assert_array_equal(bounded, every)
    assert sum(recomputed[before:]) == passes * len(x)


def test_sample_rows_are_spread_over_the_whole_stream() -> None:
    x = np.arange(10_000, dtype=np.float32)[:, None]
    chosen = _choose(np.random.default_rng(0), len(x), 500)
    got = np.concatenate(list(_select(_chunks(x, 999), chosen)))[:, 0]
    np.testing.assert_array_equal(got, chosen.astype(np.float32))
    assert len(np.unique(chosen)) == 500 and got.min() < 1000 and got.max() > 9000


def test_too_few_rows_for_k_is_refused() -> None:
    x, _ = _blobs(10, k=2)
    with pytest.raises(ValueError, match="cannot fit 20 clusters on 10 rows"):
        fit_streamed_kmeans(_chunks(x, 4), KMeansSettings(20))


# ----------------------------------------------------------------------------- python -m engine.cluster


@pytest.fixture(scope="module")
def cmu_store(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_store(cmu_svs, tmp_path_factory)


def test_cluster_cli_on_the_cmu_slide(
    cmu_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = copy_store(cmu_store, tmp_path)
    assert (
        cluster_main([str(path), "--k", "4", "--name", "r4", "--seed", "3", "--exemplars", "2"])
        == 0
    )
    table = capsys.readouterr().out
    assert "cluster run 'r4'" in table and "share" in table

    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    sf = store.slide(sid)
    tissue = sf.selected & np.asarray(sf.done[...])
    run = store.read_cluster_run("r4")
    labels = run.labels[sid]
    assert run.centroids.shape == (4, store.dim)
    assert labels.dtype == np.int16 and labels.shape == sf.shape
    np.testing.assert_array_equal(labels >= 0, tissue)  # every tissue tile assigned, -1 elsewhere
    assert labels.max() < 4

    a = run.attrs
    assert (a["k"], a["seed"], a["algorithm"], a["normalize"]) == (4, 3, "minibatch-kmeans", "l2")
    assert a["n_fit_tiles"] == a["n_tiles"] == int(tissue.sum())
    assert a["counts"][sid] == np.bincount(labels[labels >= 0], minlength=4).tolist()
    assert sum(a["shares"][sid]) == pytest.approx(1.0, abs=1e-4)

    # labels are the nearest l2-normalised centroid of each tile's stored feature
    r, c = np.nonzero(tissue)
    feats = sf.read_tiles(r, c)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    d = np.linalg.norm(feats[:, None] - run.centroids[None], axis=2)
    np.testing.assert_array_equal(labels[r, c], d.argmin(1))
    # exemplars are the tiles nearest each centroid
    for cl, row in enumerate(a["exemplars"]):
        members = np.flatnonzero(labels[r, c] == cl)
        nearest = np.sort(d[members, cl])[: len(row)]
        assert len(row) == min(2, len(members))
        np.testing.assert_allclose([e["distance"] for e in row], nearest, rtol=1e-4, atol=1e-5)
        for e in row:
            assert labels[e["row"], e["col"]] == cl
            assert [e["l0_x"], e["l0_y"]] == sf.origins[e["row"], e["col"]].tolist()

    assert FeatureStore(store.root, path).encoder == EncoderId.from_attrs(a["encoder"])
    mosaic = Image.open(store.run_file("r4", "exemplars.png"))
    assert mosaic.height >= 4 * 128 and mosaic.width >= 2 * 128
    overlay = np.asarray(Image.open(store.run_file("r4", f"overlays/{sid}.png")).convert("RGB"))
    assert overlay.shape[0] >= 512 and len(np.unique(overlay.reshape(-1, 3), axis=0)) > 100


def test_cluster_is_deterministic_and_sample_caps_fitting(cmu_store: Path, tmp_path: Path) -> None:
    path = copy_store(cmu_store, tmp_path)
    common = ["--k", "3", "--exemplars", "0", "--no-overlays", "--quiet"]
    assert cluster_main([str(path), "--name", "a", *common]) == 0
    assert cluster_main([str(path), "--name", "b", *common]) == 0
    assert cluster_main([str(path), "--name", "s", "--sample", "10", *common]) == 0
    store = FeatureStore.open(path)
    a, b, s = (store.read_cluster_run(n) for n in "abs")
    np.testing.assert_array_equal(a.centroids, b.centroids)
    for sid in a.labels:
        np.testing.assert_array_equal(a.labels[sid], b.labels[sid])
        np.testing.assert_array_equal(s.labels[sid] >= 0, a.labels[sid] >= 0)  # all still assigned
    assert s.attrs["n_fit_tiles"] == 10 and s.attrs["n_tiles"] == a.attrs["n_tiles"] > 10
    assert store.run_file("a", "exemplars.png") is None
    assert store.latest_cluster_run() == "s"


def test_cluster_over_several_slides_and_chunks(cmu_svs: Path, tmp_path: Path) -> None:
    path = synthetic_store(cmu_svs, tmp_path / "f.zarr", ids=("a", "b"))
    assert (
        cluster_main(
            [
                str(path),
                "--k",
                "5",
                "--exemplars",
                "0",
                "--no-overlays",
                "--quiet",
                "--batch-size",
                "256",
            ]
        )
        == 0
    )
    assert (
        cluster_main(
            [str(path), "--k", "5", "--slides", "b", "--exemplars", "0", "--no-overlays", "--quiet"]
        )
        == 0
    )
    store = FeatureStore.open(path)
    assert store.cluster_runs() == ["k5", "k5-2"]
    both, only_b = store.read_cluster_run("k5"), store.read_cluster_run("k5-2")
    assert set(both.labels) == {"a", "b"} and set(only_b.labels) == {"b"}
    assert both.attrs["slides"] == ["a", "b"] and only_b.attrs["slides"] == ["b"]
    for sid in ("a", "b"):
        sf = store.slide(sid)
        np.testing.assert_array_equal(both.labels[sid] >= 0, sf.selected)
    assert both.attrs["n_tiles"] == 2 * only_b.attrs["n_tiles"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--slides", "nope"], "no slide 'nope'"),
        (["--k", "100000"], "fewer than k=100000"),
        (["--k", "0"], "--k must be at least 1, got 0 — pass --k 1 or more"),
        (["--name", "bad/name"], "pass another --name"),
        (["--name", "taken"], "exists — pass --overwrite"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--thumbnail-px", "0"], "--thumbnail-px must be at least 1"),
        (["--sample", "-1"], "--sample must be 0 or more"),
        (["--exemplars", "-2"], "--exemplars must be 0 or more"),
    ],
)
def test_cluster_cli_errors_are_one_line(
    cmu_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    path = copy_store(cmu_store, tmp_path)
    assert (
        cluster_main(
            [
                str(path),
                "--k",
                "2",
                "--name",
                "taken",
                "--quiet",
                "--exemplars",
                "0",
                "--no-overlays",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cluster_main([str(path), "--k", "2", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert FeatureStore.open(path).cluster_runs() == ["taken"]


def test_cluster_cli_on_a_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cluster_main([str(tmp_path / "none.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "engine.extract" in err


# ----------------------------------------------------------------------------- the sample slide


SAMPLE = REPO / "sample_data" / "sample_slide.tiff"
SAMPLE_MASK = REPO / "sample_data" / "sample_slide_mask.png"
SAMPLE_ENCODER = REPO / "sample_data" / "sample_encoder.pt"
ARTEFACTS = {"green ink": 4, "blue ink": 5, "fold": 6}


def tile_truth(store: FeatureStore, sid: str, mask: np.ndarray, factor: int) -> np.ndarray:
    """(rows, cols) ground-truth label of each tile: the label covering > 50 % of it, else -1."""
    sf = store.slide(sid)
    tile = sf.attrs["tile_l0"]
    origins = np.asarray(sf.origins[...])
    rows, cols = sf.shape
    truth = np.full((rows, cols), -1)
    area = (tile[0] / factor) * (tile[1] / factor)
    for r, c in itertools.product(range(rows), range(cols)):
        x, y = origins[r, c]
        block = mask[
            int(y // factor) : int((y + tile[1]) // factor),
            int(x // factor) : int((x + tile[0]) // factor),
        ]
        counts = np.bincount(block.ravel(), minlength=256) / area
        if counts.max() > 0.5:
            truth[r, c] = counts.argmax()
    return truth


def best_iou(labels: np.ndarray, target: np.ndarray, k: int) -> tuple[float, tuple[int, ...]]:
    """Highest tile IoU with ``target`` of one cluster or a union of two."""
    best = (0.0, ())
    for group in itertools.chain(((c,) for c in range(k)), itertools.combinations(range(k), 2)):
        pred = np.isin(labels, group)
        iou = (pred & target).sum() / max(1, (pred | target).sum())
        best = max(best, (float(iou), group))
    return best


@pytest.mark.slow
@pytest.mark.skipif(
    not SAMPLE.exists() or not SAMPLE_MASK.exists(),
    reason="sample_data/sample_slide.tiff not generated (python sample_data/make_sample_slide.py)",
)
@pytest.mark.parametrize(
    "encoder,artefacts",
    [
        ("resnet18-random", ("green ink", "blue ink", "fold")),
        # the shipped default: its colour jitter makes it blind to the fold, not to ink
        (str(SAMPLE_ENCODER), ("green ink", "blue ink")),
    ],
    ids=["resnet18-random", "sample-encoder"],
)
def test_sample_slide_artefacts_are_recovered_by_clusters(
    tmp_path_factory: pytest.TempPathFactory, encoder: str, artefacts: tuple[str, ...]
) -> None:
    """Each ink colour (and the fold): some cluster or union of two has tile IoU >= 0.5 (k = 8)."""
    if encoder == str(SAMPLE_ENCODER) and not SAMPLE_ENCODER.exists():
        pytest.skip("sample_data/sample_encoder.pt absent")
    store_path = real_store(SAMPLE, tmp_path_factory, encoder=encoder)
    path = copy_store(store_path, tmp_path_factory.mktemp("sample"))
    assert (
        cluster_main(
            [str(path), "--k", "8", "--name", "k8", "--quiet", "--exemplars", "0", "--no-overlays"]
        )
        == 0
    )
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    labels = store.read_cluster_labels("k8", sid)
    meta = json.loads(SAMPLE_MASK.with_suffix(".json").read_text())
    truth = tile_truth(store, sid, np.asarray(Image.open(SAMPLE_MASK)), int(meta["mask_factor"]))
    ious = {name: best_iou(labels, truth == ARTEFACTS[name], 8) for name in artefacts}
    print(
        "tile IoU (cluster or union of two):", {n: (round(v, 3), g) for n, (v, g) in ious.items()}
    )
    for name, (iou, _) in ious.items():
        assert (truth == ARTEFACTS[name]).sum() >= 10, name
        assert iou >= 0.5, (name, ious)
