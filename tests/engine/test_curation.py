"""engine.curation (names, selection, overrides; the one rule of a tile's class) and
engine.curation_match (names follow their clusters across runs and stores), on real stores.

The figures of the curation issue (IoU of the named green-ink tiles before and after k = 8 -> 9,
10) are printed by::

    .venv/bin/python -m pytest tests/engine/test_curation.py -k follow -s -q -p no:cacheprovider
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.curation import FORMAT, VERSION, Change, Curation, check_name
from engine.curation_match import (
    MIN_SHARE,
    carry_over,
    centred_cosine,
    overlap,
)
from engine.errors import HistoclusterError, StoreError
from engine.store import FeatureStore
from tests.conftest import SHARED_DATA
from tests.engine.clustering_fixtures import copy_store, real_store

REPO = Path(__file__).resolve().parents[2]
CMU = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"  # honours $HISTOCLUSTER_SHARED_DATA
SAMPLE = REPO / "sample_data" / "sample_slide.tiff"
SAMPLE_MASK = REPO / "sample_data" / "sample_slide_mask.png"
SAMPLE_ENCODER = REPO / "sample_data" / "sample_encoder.pt"
GREEN_INK, BLUE_INK = 4, 5

needs_sample = pytest.mark.skipif(
    not (SAMPLE.exists() and SAMPLE_MASK.exists() and SAMPLE_ENCODER.exists()),
    reason="sample_data/ (slide, mask, encoder) absent",
)


# ----------------------------------------------------------------------------- helpers


def cluster(store_path: Path, k: int, name: str, seed: int = 0, *extra: str) -> None:
    """Cluster a store into run ``name`` (the one place that calls engine.cluster)."""
    from engine.cluster import main

    argv = [str(store_path), "--k", str(k), "--name", name, "--seed", str(seed)]
    rc = main([*argv, "--quiet", "--exemplars", "0", "--no-overlays", *extra])
    assert rc == 0


def tile_truth(store: FeatureStore, sid: str, mask_path: Path) -> np.ndarray:
    """(rows, cols) ground-truth label of each tile: the label covering > 50 % of it, else -1."""
    mask = np.asarray(Image.open(mask_path))
    factor = int(json.loads(mask_path.with_suffix(".json").read_text())["mask_factor"])
    sf = store.slide(sid)
    tw, th = (int(round(v / factor)) for v in sf.attrs["tile_l0"])
    truth = np.full(sf.shape, -1)
    for r in range(sf.shape[0]):
        for c in range(sf.shape[1]):
            x, y = (int(v) // factor for v in sf.origins[r, c])
            block = mask[y : y + th, x : x + tw]
            counts = np.bincount(block.ravel(), minlength=256)
            if counts.max() > 0.5 * tw * th:
                truth[r, c] = counts.argmax()
    return truth


def best_cluster(labels: np.ndarray, target: np.ndarray) -> tuple[int, float]:
    """The single cluster with the highest tile IoU with ``target``, and that IoU."""
    ious = [
        ((labels == c) & target).sum() / max(1, ((labels == c) | target).sum())
        for c in range(int(labels.max()) + 1)
    ]
    return int(np.argmax(ious)), float(max(ious))


def tiles_of(cur: Curation, store: FeatureStore, name: str, selected_only: bool = False) -> set:
    """{(slide_id, row, col)} under class ``name``."""
    return {
        (part.slide_id, int(r), int(c))
        for part in cur.assignments(store, selected_only=selected_only)
        if part.class_name == name
        for r, c in zip(part.rows, part.cols, strict=True)
    }


def iou(a: set, b: set) -> float:
    return len(a & b) / max(1, len(a | b))


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the sample slide's store (sample encoder) with runs k8, k9, k10 (seed 0), k8s1."""
    src = real_store(SAMPLE, tmp_path_factory, encoder=str(SAMPLE_ENCODER))
    path = copy_store(src, tmp_path_factory.mktemp("curation"))
    for k in (8, 9, 10):
        cluster(path, k, f"k{k}")
    cluster(path, 8, "k8s1", 1)
    return path


@pytest.fixture(scope="module")
def ink_curation(sample_store: Path) -> tuple[Curation, str, int]:
    """The k8 curation naming (and selecting) the green-ink cluster, as a user would; (curation, slide, cluster)."""
    store = FeatureStore.open(sample_store)
    (sid,) = store.slide_ids()
    truth = tile_truth(store, sid, SAMPLE_MASK)
    ink, ink_iou = best_cluster(store.read_cluster_labels("k8", sid), truth == GREEN_INK)
    assert ink_iou >= 0.5, ink_iou  # the sample encoder separates the green ink
    cur = Curation.for_run(store, "k8")
    cur.name_cluster(ink, "green ink")
    cur.select(ink)
    return cur, sid, ink


# ----------------------------------------------------------------------------- the model alone


def test_names_are_trimmed_and_blank_means_none() -> None:
    assert check_name("  ink ") == "ink"
    assert check_name("") is None and check_name("   ") is None and check_name(None) is None
    with pytest.raises(ValueError):
        check_name("a\nb")
    with pytest.raises(TypeError):
        check_name(3)  # type: ignore[arg-type]


def test_edits_notify_observers_once_and_only_on_change() -> None:
    cur = Curation("k4", 4)
    seen: list[Change] = []
    cur.connect(seen.append)
    cur.name_cluster(2, "ink")
    cur.name_cluster(2, "ink")  # no change, no event
    cur.select(2)
    cur.override_tiles("s", [1, 2], [3, 4], None)
    cur.clear_override("s", 9, 9)  # nothing to clear, no event
    cur.clear_override("s", 1, 3)
    assert [c.kind for c in seen] == ["name", "select", "override", "override"]
    assert seen[0].cluster == 2 and seen[2].rows == (1, 2) and seen[3].cols == (3,)
    cur.disconnect(seen.append)
    cur.name_cluster(0, "x")
    assert len(seen) == 4
    with pytest.raises(IndexError):
        cur.name_cluster(4, "out of range")


def test_the_rule_unnamed_unselected_excluded_and_moved_tiles() -> None:
    cur = Curation("k3", 3)
    cur.name_cluster(0, "ink")
    cur.select(0)
    cur.name_cluster(1, "fold")  # named, not selected
    cur.select(2)  # selected, unnamed
    cur.override_tile("s", 0, 0, None)  # an ink tile excluded
    cur.override_tile("s", 0, 1, "ink")  # an unnamed tile moved to ink
    cur.override_tile("s", 1, 1, "bubble")  # a class made by overrides alone
    cur.override_tile("s", 1, 2, "fold")  # moved to a class that is not exported
    labels = np.array([[0, 2, 0], [-1, 1, 2]])
    assert cur.classes() == ["ink", "fold", "bubble"]
    assert cur.exported_classes() == ["ink", "bubble"]
    every = cur.class_map("s", labels)
    np.testing.assert_array_equal(every, [[-1, 0, 0], [-1, 2, 1]])
    export = cur.class_map("s", labels, selected_only=True)
    np.testing.assert_array_equal(export, [[-1, 0, 0], [-1, 2, -1]])
    assert cur.class_of("s", 0, 0, 0) is None and cur.class_of("s", 0, 2, 0) == "ink"
    assert cur.class_of("other", 0, 0, 2) is None
    assert cur.class_map("s", labels, classes=["fold"]).max() == 0  # other classes -> -1


def test_json_round_trip_and_refusals() -> None:
    cur = Curation("k3", 3, run_created="2024")
    cur.name_cluster(1, "ink")
    cur.select(1)
    cur.override_tiles("a", [5, 6], [7, 8], None)
    cur.override_tile("b", 0, 0, "bubble")
    doc = json.loads(json.dumps(cur.to_json()))
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    assert Curation.from_json(doc) == cur
    assert cur.copy() == cur and cur.copy() is not cur
    with pytest.raises(StoreError, match="newer|update"):
        Curation.from_json({**doc, "version": VERSION + 1})
    with pytest.raises(StoreError, match="not a histocluster curation"):
        Curation.from_json({"k": 3})
    bad = {**doc, "overrides": {"a": {"rows": [1], "cols": [], "class": [None]}}}
    with pytest.raises(StoreError, match="damaged"):
        Curation.from_json(bad, where="x.json")


def test_overlap_and_centred_cosine_reference() -> None:
    old = {"a": np.array([[0, 0, 1], [-1, 1, 1]]), "gone": np.zeros((1, 1), int)}
    new = {"a": np.array([[2, 2, 0], [1, -1, 0]])}
    np.testing.assert_array_equal(overlap(old, new, 2, 3), [[0, 0, 2], [2, 0, 0]])
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 6)), rng.standard_normal((3, 6))
    ref = np.array(
        [
            [
                np.dot(x - a.mean(0), y - a.mean(0))
                / np.linalg.norm(x - a.mean(0))
                / np.linalg.norm(y - a.mean(0))
                for y in a
            ]
            for x in b
        ]
    )
    np.testing.assert_allclose(centred_cosine(a, b), ref, atol=1e-12)
    # an all-positive offset does not make unrelated centroids similar
    off = np.abs(rng.standard_normal((5, 64))) + 10.0
    raw = off @ off.T / np.outer(np.linalg.norm(off, axis=1), np.linalg.norm(off, axis=1))
    assert raw.min() > 0.98
    assert np.sort(centred_cosine(off, off), axis=1)[:, -2].max() < 0.9


# ----------------------------------------------------------------------------- on the sample slide


@needs_sample
def test_persistence_beside_the_run(sample_store: Path, ink_curation) -> None:
    cur, sid, ink = ink_curation
    cur = cur.copy()
    cur.override_tiles(sid, [0, 1], [0, 1], "background")
    store = FeatureStore.open(sample_store, mode="r+")
    assert Curation.load(store, "k9") == Curation.for_run(store, "k9")  # none saved: blank
    cur.save(store)
    assert (sample_store / "clusters" / "k8" / "curation.json").is_file()
    again = Curation.load(FeatureStore.open(sample_store), "k8")
    assert again == cur and again.name_of(ink) == "green ink" and again.is_selected(ink)
    assert again.run_created == store.read_cluster_run("k8", slide_ids=[]).attrs["created"]
    (sample_store / "clusters" / "k8" / "curation.json").unlink()


@needs_sample
def test_a_curation_never_names_a_later_run_of_the_same_name(sample_store: Path, tmp_path) -> None:
    path = copy_store(sample_store, tmp_path)
    store = FeatureStore.open(path, mode="r+")
    cur = Curation.for_run(store, "k9")
    cur.name_cluster(0, "tissue")
    cur.save(store)
    cluster(path, 6, "k9", 0, "--overwrite")
    store = FeatureStore.open(path)
    try:
        loaded = Curation.load(store, "k9")  # the file went with the old run ...
    except StoreError as e:  # ... or is refused, naming the file and the fix
        assert "curation.json" in str(e) and "delete" in str(e)
    else:
        assert loaded.k == 6 and loaded.names == (None,) * 6


@needs_sample
@pytest.mark.slow
def test_names_follow_the_ink_cluster_when_k_changes(sample_store: Path, ink_curation) -> None:
    """The curation issue's figure: IoU of the named tiles before and after k = 8 -> 9, 10 >= 0.9."""
    cur, sid, _ = ink_curation
    store = FeatureStore.open(sample_store)
    before = tiles_of(cur, store, "green ink", selected_only=True)
    truth = tile_truth(store, sid, SAMPLE_MASK) == GREEN_INK
    assert len(before) >= 10
    figures = {}
    for run in ("k9", "k10", "k8s1"):
        new, report, lost = carry_over(cur, store, run)
        after = tiles_of(new, store, "green ink", selected_only=True)
        figures[run] = iou(before, after)
        truth_iou = len({(sid, r, c) for r, c in np.argwhere(truth)} & after) / max(
            1, len({(sid, r, c) for r, c in np.argwhere(truth)} | after)
        )
        print(
            f"k8 -> {run}: named tiles {len(before)} -> {len(after)}, IoU {figures[run]:.3f}, "
            f"IoU with the green-ink ground truth {truth_iou:.3f}; report: {report}"
        )
        assert any(line.startswith("'green ink' → cluster") for line in report), report
        assert lost == [], lost  # nothing the user made was lost
        assert new.run == run and new.k == int(run[1:3].rstrip("s"))
        assert all(new.is_selected(c) for c in new.clusters_of("green ink"))
        assert len(new.clusters_of("green ink")) >= 1
    assert figures["k9"] >= 0.9 and figures["k10"] >= 0.9, figures


@needs_sample
def test_overrides_survive_carry_over_and_export_honours_them(
    sample_store: Path, ink_curation
) -> None:
    cur, sid, ink = ink_curation
    cur = cur.copy()
    store = FeatureStore.open(sample_store)
    labels = store.read_cluster_labels("k8", sid)
    ink_tiles = np.argwhere(labels == ink)
    other = np.argwhere((labels >= 0) & (labels != ink))
    (r0, c0), (r1, c1) = ink_tiles[:2]
    cur.override_tiles(sid, [r0, r1], [c0, c1], None)  # two ink tiles excluded
    moved = tuple(int(v) for v in other[0])
    cur.override_tile(sid, *moved, "green ink")  # a tissue tile moved to ink
    bubble = tuple(int(v) for v in other[1])
    cur.override_tile(sid, *bubble, "bubble")  # a class of its own
    for run in ("k9", "k10"):
        new, report, lost = carry_over(cur, store, run)
        assert new.overrides() == cur.overrides()
        assert any("4 per-tile override(s) stay" in line for line in report), report
        assert not any("override" in line for line in lost), lost
        ink_now = tiles_of(new, store, "green ink", selected_only=True)
        assert (sid, int(r0), int(c0)) not in ink_now and (sid, int(r1), int(c1)) not in ink_now
        assert (sid, *moved) in ink_now
        assert tiles_of(new, store, "bubble", selected_only=True) == {(sid, *bubble)}
        excluded = {(sid, int(r0), int(c0)), (sid, int(r1), int(c1))}
        for part in new.assignments(store, selected_only=False):
            got = {(sid, int(r), int(c)) for r, c in zip(part.rows, part.cols, strict=True)}
            assert not got & excluded


@needs_sample
def test_assignments_never_yield_a_tile_of_an_unnamed_or_unselected_cluster(
    sample_store: Path, ink_curation
) -> None:
    cur, sid, ink = ink_curation
    store = FeatureStore.open(sample_store)
    new, _, _ = carry_over(cur, store, "k10")
    named = [c for c in range(new.k) if new.name_of(c) is None][0]
    new.name_cluster(named, "tissue")  # named but not selected
    new.override_tile(sid, 0, 0, "tissue")  # an override to a class that is not exported
    labels = store.read_cluster_labels("k10", sid)
    total = 0
    for part in new.assignments(store):  # selected_only: what export writes
        assert part.class_name in new.exported_classes()
        for r, c, cl, over in zip(
            part.rows, part.cols, part.clusters, part.overridden, strict=True
        ):
            assert cl == labels[r, c]
            if over:
                assert new.overrides(sid)[(sid, int(r), int(c))] == part.class_name
            else:
                assert new.name_of(int(cl)) == part.class_name and new.is_selected(int(cl))
            total += 1
    assert total == len(tiles_of(new, store, "green ink", selected_only=True)) > 0
    assert "tissue" not in {p.class_name for p in new.assignments(store)}
    assert tiles_of(new, store, "tissue") == {
        (sid, int(r), int(c)) for r, c in np.argwhere(labels == named)
    } | {(sid, 0, 0)}
    counts = new.counts(store, selected_only=True)
    assert counts["green ink"][sid] == total and counts["tissue"] == {}


@needs_sample
def test_a_name_whose_tiles_scatter_is_cleared_with_a_line(sample_store: Path) -> None:
    store = FeatureStore.open(sample_store)
    (sid,) = store.slide_ids()
    cur = Curation.for_run(store, "k8")
    k8, k8s1 = (store.read_cluster_labels(r, sid) for r in ("k8", "k8s1"))
    m = overlap({sid: k8}, {sid: k8s1}, 8, 8)
    share = (m / np.maximum(1, m.sum(0))).max(0)  # best old share of each new cluster
    moved = int(np.argmin(m.max(1) / m.sum(1)))  # the old cluster that scattered most
    cur.name_cluster(moved, "scattered")
    new, report, lost = carry_over(cur, store, "k8s1")
    line = next(line for line in report if line.startswith("'scattered'"))
    if new.clusters_of("scattered"):  # it still has a cluster made >= 90 % of its tiles
        assert share[new.clusters_of("scattered")].min() >= MIN_SHARE
        assert line not in lost
    else:
        assert "cleared" in line and lost == [line], (line, lost)
    print(report)


def _second_sample_slide(out: Path) -> Path:
    """A second generated slide (same layout, another seed)."""
    res = subprocess.run(
        [sys.executable, str(REPO / "sample_data" / "make_sample_slide.py"), "--out-dir", str(out)]
        + ["--seed", "1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return out / "sample_slide.tiff"


@pytest.fixture(scope="module")
def slide2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _second_sample_slide(tmp_path_factory.mktemp("slide2"))


@needs_sample
@pytest.mark.slow
def test_names_follow_their_cluster_onto_added_slides(
    sample_store: Path, ink_curation, slide2: Path, tmp_path: Path
) -> None:
    """More slides: the run over both slides names the second slide's green ink too."""
    import shutil

    from engine.extract import main as extract_main

    cur, sid, _ = ink_curation
    path = copy_store(sample_store, tmp_path)
    renamed = tmp_path / "sample_slide_2.tiff"
    shutil.copy(slide2, renamed)
    argv = [str(renamed), "--out", str(path), "--encoder", str(SAMPLE_ENCODER), "--tile-px", "64"]
    assert (
        extract_main([*argv, "--mpp", "2.0", "--workers", "0", "--device", "cpu", "--quiet"]) == 0
    )
    cluster(path, 9, "both")
    store = FeatureStore.open(path)
    assert store.slide_ids() == [sid, "sample_slide_2"]
    new, report, _ = carry_over(cur, store, "both")
    print(report)
    before = tiles_of(cur, store, "green ink")
    after = tiles_of(new, store, "green ink")
    on_first = {t for t in after if t[0] == sid}
    truth2 = tile_truth(store, "sample_slide_2", slide2.parent / "sample_slide_mask.png")
    ink2 = {("sample_slide_2", int(r), int(c)) for r, c in np.argwhere(truth2 == GREEN_INK)}
    on_second = after - on_first
    print(
        f"k8 (one slide) -> k9 (two slides): IoU on the first slide {iou(before, on_first):.3f}, "
        f"second slide's 'green ink' tiles {len(on_second)}, IoU with its ground truth "
        f"{iou(on_second, ink2):.3f}"
    )
    assert iou(before, on_first) >= 0.9
    assert iou(on_second, ink2) >= 0.5


@needs_sample
@pytest.mark.slow
def test_across_stores_names_match_by_centroid(
    sample_store: Path,
    ink_curation,
    slide2: Path,
    cmu_svs: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """No tile in common: green ink finds the other slide's green ink, and nothing on the CMU slide."""
    cur, sid, _ = ink_curation
    cur = cur.copy()
    cur.override_tile(sid, 0, 0, None)  # the other store's slide has the same id, not the same file
    old_store = FeatureStore.open(sample_store)
    other = copy_store(
        real_store(slide2, tmp_path_factory, encoder=str(SAMPLE_ENCODER)),
        tmp_path_factory.mktemp("other"),
    )
    cluster(other, 8, "k8")
    store2 = FeatureStore.open(other)
    (sid2,) = store2.slide_ids()
    new, report, lost = carry_over(cur, store2, "k8", old_store=old_store)
    print(report)
    truth2 = tile_truth(store2, sid2, slide2.parent / "sample_slide_mask.png") == GREEN_INK
    ink2, _ = best_cluster(store2.read_cluster_labels("k8", sid2), truth2)
    assert new.clusters_of("green ink") == [ink2], report
    assert sum(n is not None for n in new.names) == 1
    assert "no tile in common" in report[0] and "centroid" in report[0]
    assert store2.slide_ids() == [sid] and new.n_overrides() == 0
    assert any("dropped" in line for line in report)
    assert lost == [line for line in report if "dropped" in line]  # the name was not lost

    cmu = copy_store(
        real_store(cmu_svs, tmp_path_factory, encoder=str(SAMPLE_ENCODER)),
        tmp_path_factory.mktemp("cmu"),
    )
    cluster(cmu, 8, "k8")
    new, report, lost = carry_over(cur, FeatureStore.open(cmu), "k8", old_store=old_store)
    print(report)
    assert new.names == (None,) * 8
    assert any(line.startswith("'green ink' had no match") for line in lost), lost


@needs_sample
def test_from_classes_names_several_clusters_per_class(sample_store: Path) -> None:
    store = FeatureStore.open(sample_store)
    cur = Curation.from_classes(store, "k8", {"ink": [2, 5], "tissue": [0, 1]})
    assert cur.clusters_of("ink") == [2, 5] and cur.selected[:3] == (True, True, True)
    with pytest.raises(HistoclusterError, match="one class"):
        Curation.from_classes(store, "k8", {"ink": [2], "tissue": [2]})
