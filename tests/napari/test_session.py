"""The widget's Qt-free side: jobs, cohort rows, the gallery's choice of tiles (no viewer)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.curation_match import carry_over
from engine.progress import Cancelled
from engine.store import FeatureStore
from engine.tiling import Tiling
from histocluster_napari._cohort import cohort_rows, folder_slides, store_slides
from histocluster_napari._gallery import gallery_order, read_gallery
from histocluster_napari._session import (
    ClusterJob,
    ClusterView,
    cluster,
    ensure_features,
    open_run,
    recluster,
)
from tests.napari.conftest import FAST

TILING = Tiling(tile_px=FAST["tile_px"], target_mpp=FAST["target_mpp"])


def job_for(slides, store: Path | None = None, **changes) -> ClusterJob:
    job = ClusterJob(tuple(slides), None, FAST["encoder"], TILING, FAST["k"], store)
    return replace(job, **changes)


def test_cache_store_path_depends_on_every_tiling_setting(sample_slide, isolated_cache):
    base = job_for([sample_slide])
    paths = {
        base.store_path(),
        replace(base, tiling=replace(TILING, tissue_method="hsv")).store_path(),
        replace(base, tiling=replace(TILING, min_tissue=0.2)).store_path(),
        replace(base, tiling=replace(TILING, tile_px=32)).store_path(),
        replace(base, encoder="resnet34-random").store_path(),
    }
    assert len(paths) == 5 and all(p.parent == isolated_cache / "stores" for p in paths)
    assert replace(base, k=7).store_path() == base.store_path()  # k is not part of the features


@pytest.fixture(scope="module")
def two_slide_store(tmp_path_factory, cohort_dir) -> tuple[Path, list[Path]]:
    slides = [p for p in folder_slides(cohort_dir) if p.stem != "CMU-1-Small-Region"]
    store = tmp_path_factory.mktemp("two") / "features.zarr"
    assert [r.status for r in cohort_rows(store, slides)] == ["not extracted"] * 2
    report = ensure_features(job_for(slides, store))
    assert report.encoded > 0 and report.failures == []
    return store, slides


def test_cohort_rows_and_store_slides(two_slide_store):
    store, slides = two_slide_store
    rows = cohort_rows(store, slides)
    assert [r.slide_id for r in rows] == ["sample_slide", "second_slide"]
    assert all(r.status == "encoded" and r.tissue == r.encoded > 0 for r in rows)
    assert sorted(p.name for p in store_slides(store)) == sorted(p.name for p in slides)
    # A second request finds everything encoded (FeatureStore.coverage): nothing to do.
    assert ensure_features(job_for(slides, store)).encoded == 0


def test_gallery_order_spreads_over_slides_and_covers_the_cluster_once(two_slide_store):
    store_path, slides = two_slide_store
    view = cluster(job_for(slides, store_path))
    store = FeatureStore.open(store_path)
    for c in range(view.k):
        order = gallery_order(store, view.run, c, view.labels, n_nearest=4, per_slide=2)
        keys = [(t.slide_id, t.row, t.col) for t in order]
        expected = {
            (s, int(r), int(col))
            for s in view.slide_ids
            for r, col in np.argwhere(view.labels[s] == c)
        }
        assert len(keys) == len(set(keys)) and set(keys) == expected
        nearest = [t for t in order if t.nearest]
        assert len(nearest) <= 4
        per = {s: sum(t.slide_id == s for t in nearest) for s in view.slide_ids}
        assert max(per.values(), default=0) <= 2
        present = [s for s in view.slide_ids if (view.labels[s] == c).any()]
        if len(nearest) >= len(present):
            assert {t.slide_id for t in nearest} == set(present)  # every slide it is on
        # The first round is each slide's nearest tile, by distance.
        first = nearest[: len(present)]
        assert [t.distance for t in first] == sorted(t.distance for t in first)
    tiles = gallery_order(store, view.run, 0, view.labels)[:3]
    pictures = list(read_gallery(str(store_path), tiles, px=32))
    assert [t for t, _ in pictures] == tiles
    assert all(rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8 for _, rgb in pictures)


def test_open_run_restores_the_saved_curation(two_slide_store):
    store_path, slides = two_slide_store
    view = cluster(job_for(slides, store_path))
    view.curation.name_cluster(1, "stroma")
    view.curation.select(1)
    view.curation.override_tile("second_slide", 0, 0, None)
    view.curation.save(FeatureStore.open(store_path, mode="r+"))
    again = open_run(store_path)
    assert again.run == view.run and again.curation == view.curation
    assert [len(row) for row in again.exemplars] == [len(row) for row in view.exemplars]
    np.testing.assert_array_equal(again.totals, view.totals)
    # Clustering again carries the names over (same k and seed: the same clusters).
    third = cluster(job_for(slides, store_path))
    assert third.run != view.run and third.curation.names == view.curation.names
    assert third.curation.overrides() == view.curation.overrides()


def test_recluster_paints_before_writing_and_equals_the_stored_run(two_slide_store):
    store_path, slides = two_slide_store
    first = cluster(job_for(slides, store_path))
    first.curation.name_cluster(0, "tumour")
    first.curation.select(0)
    painted: list[tuple[ClusterView, list[str]]] = []

    def on_view(view: ClusterView) -> None:  # the widget's repaint, in the worker thread
        painted.append((view, FeatureStore.open(store_path).cluster_runs()))

    new = recluster(first, first.k + 1, on_view=on_view)
    ((shown, listed),) = painted
    assert shown is new and new.run not in listed  # painted before the run was written
    store = FeatureStore.open(store_path)
    assert new.run in store.cluster_runs()  # complete once recluster returns
    again = open_run(store_path, new.run)  # the run as the store holds it
    assert again.curation == new.curation and again.curation.run_created is not None
    assert again.slide_ids == new.slide_ids
    for s in new.slide_ids:
        np.testing.assert_array_equal(again.labels[s], new.labels[s])
        np.testing.assert_array_equal(again.counts[s], new.counts[s])
        np.testing.assert_array_equal(again.failed[s], new.failed[s])
        assert again.geometry[s] == new.geometry[s] and again.sources[s] == new.sources[s]
    np.testing.assert_array_equal(again.centroids, new.centroids)
    # the names were carried in memory as carry_over carries them from the stored runs
    stored = carry_over(first.curation, store, new.run)
    assert new.curation.names == stored.curation.names and "tumour" in new.curation.names
    assert new.carried == list(stored.report) and new.carried_lost == list(stored.lost)


def test_a_recluster_cancelled_before_the_repaint_leaves_no_run(two_slide_store):
    store_path, slides = two_slide_store
    first = cluster(job_for(slides, store_path))
    runs = FeatureStore.open(store_path).cluster_runs()

    def cancel_in_kmeans(stage: str, done: int, total: int) -> None:
        if stage == "kmeans" and done > 0:
            raise Cancelled("cancelled by the user")

    with pytest.raises(Cancelled):
        recluster(first, first.k + 2, progress=cancel_in_kmeans, on_view=pytest.fail)
    assert FeatureStore.open(store_path).cluster_runs() == runs
