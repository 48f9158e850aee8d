"""engine.cluster.run: the progress protocol, Cancel and kill -9 consistency, encoder records, pictures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from engine.cluster import ClusterConfig, ClusterFeatures, ClusterResult, run
from engine.cluster import main as cluster_main
from engine.encoder_id import EncoderId
from engine.errors import StoreError
from engine.progress import Cancelled
from engine.store import FeatureStore
from tests.engine.clustering_fixtures import copy_store, real_store, synthetic_store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cmu_store(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_store(cmu_svs, tmp_path_factory)


def _cfg(path: Path, **kw) -> ClusterConfig:
    base = {"k": 3, "name": "r", "exemplars": 2, "thumbnail_px": 256, "quiet": True}
    return ClusterConfig(store=path, **{**base, **kw})


class Recorder:
    """A progress callback that records every call and raises ``Cancelled`` at one stage."""

    def __init__(self, cancel_at: str | None = None) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.cancel_at = cancel_at

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.calls.append((stage, done, total))
        if stage == self.cancel_at and done > 0:
            raise Cancelled

    def stages(self) -> list[str]:
        return list(dict.fromkeys(s for s, _, _ in self.calls))


def test_run_reports_every_stage_to_its_end(cmu_store: Path, tmp_path: Path) -> None:
    path = copy_store(cmu_store, tmp_path)
    rec = Recorder()
    result = run(_cfg(path), progress=rec)
    assert rec.stages() == ["features", "kmeans", "assign", "exemplars", "overlays"]
    for stage in rec.stages():
        seen = [(d, t) for s, d, t in rec.calls if s == stage]
        dones = [d for d, _ in seen]
        assert dones == sorted(dones) and dones[0] == 0  # starts at 0, never goes back
        assert seen[-1][0] == seen[-1][1] > 0  # ends at its total
    assert [t for s, _, t in rec.calls if s == "assign"][0] == result.n_tiles
    assert [t for s, _, t in rec.calls if s == "features"][0] == result.n_tiles
    assert [t for s, _, t in rec.calls if s == "overlays"][0] == 1  # one slide
    # the exemplar pixels come back to the caller (the GUI shows them), as read from the slide
    assert [len(r) for r in result.exemplar_tiles] == [len(r) for r in result.exemplars]
    tile = result.exemplar_tiles[0][0]
    assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8 and tile.std() > 5


def test_cancel_during_kmeans_leaves_no_run_and_a_rerun_works(
    cmu_store: Path, tmp_path: Path
) -> None:
    path = copy_store(cmu_store, tmp_path)
    rec = Recorder(cancel_at="kmeans")
    with pytest.raises(Cancelled):
        run(_cfg(path), progress=rec)
    assert rec.stages() == ["features", "kmeans"]
    store = FeatureStore.open(path)
    assert store.cluster_runs() == []
    result = run(_cfg(path))  # same command again, no --overwrite needed
    assert FeatureStore.open(path).cluster_runs() == ["r"] and result.run == "r"


def test_cancel_during_pictures_leaves_the_run_unlisted_and_a_rerun_completes_it(
    cmu_store: Path, tmp_path: Path
) -> None:
    path = copy_store(cmu_store, tmp_path)
    for stage in ("exemplars", "overlays"):
        with pytest.raises(Cancelled):
            run(_cfg(path), progress=Recorder(cancel_at=stage))
        store = FeatureStore.open(path)
        assert store.cluster_runs() == [], stage  # written arrays, yet not a run
        with pytest.raises(Exception, match="no cluster run 'r'"):
            store.read_cluster_run("r")
    result = run(_cfg(path))
    store = FeatureStore.open(path)
    assert store.cluster_runs() == ["r"]
    (sid,) = store.slide_ids()
    assert sorted(result.pictures) == sorted(
        [store.run_file("r", "exemplars.png"), store.run_file("r", f"overlays/{sid}.png")]
    )


_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from engine.cluster import ClusterConfig, ClusterFeatures, ClusterResult, run

    def progress(stage, done, total):
        if stage == "overlays":  # exemplars.png is written by now
            os.kill(os.getpid(), signal.SIGKILL)

    run(ClusterConfig(store=sys.argv[1], k=3, name="r", exemplars=2, thumbnail_px=256, quiet=True),
        progress=progress)
    """
)


def test_kill_9_while_drawing_pictures_then_the_same_command_completes_the_run(
    cmu_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = copy_store(cmu_store, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, str(path)], env=env, cwd=REPO, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()
    assert (path / "clusters" / "r" / "files" / "exemplars.png").is_file()  # killed mid-pictures
    store = FeatureStore.open(path)
    assert store.cluster_runs() == []
    argv = [str(path), "--k", "3", "--name", "r", "--exemplars", "2", "--thumbnail-px", "256"]
    assert cluster_main(argv) == 0  # no --overwrite needed
    out = capsys.readouterr().out
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    assert store.cluster_runs() == ["r"]
    for name in ("exemplars.png", f"overlays/{sid}.png"):
        assert f"wrote {store.run_file('r', name)}" in out
        Image.open(store.run_file("r", name)).verify()


def test_k_1_is_a_valid_run(cmu_store: Path, tmp_path: Path) -> None:
    path = copy_store(cmu_store, tmp_path)
    result = run(_cfg(path, k=1, exemplars=0, overlays=False))
    labels = next(iter(result.labels.values()))
    assert set(np.unique(labels)) == {-1, 0} and result.pictures == []


def _set_store_encoder(path: Path, encoder: EncoderId) -> None:
    zarr.open_group(store=str(path), mode="r+").attrs["encoder"] = encoder.to_attrs()


def test_a_run_of_another_encoder_is_refused_even_with_the_same_dimension(
    cmu_store: Path, tmp_path: Path
) -> None:
    path = copy_store(cmu_store, tmp_path)
    run(_cfg(path, exemplars=0, overlays=False))
    store = FeatureStore.open(path)
    attrs = store.read_cluster_run("r", slide_ids=[]).attrs
    assert EncoderId.from_attrs(attrs["encoder"]) == store.encoder
    assert store.cluster_run_problem("r") is None
    store.check_cluster_run("r")

    # the store now says its features come from other weights of the same architecture and dim
    other = EncoderId(**{**store.encoder.__dict__, "sha256": "ab" * 32, "name": "other.pt"})
    _set_store_encoder(path, other)
    store = FeatureStore.open(path)
    problem = store.cluster_run_problem("r")
    assert problem is not None and "\n" not in problem
    assert "was fitted on features of encoder resnet18-random" in problem and "weights" in problem
    with pytest.raises(StoreError, match="--overwrite"):
        store.check_cluster_run("r")


def test_a_run_without_an_encoder_record_is_judged_by_its_dimension(
    cmu_store: Path, tmp_path: Path
) -> None:
    path = copy_store(cmu_store, tmp_path)
    run(_cfg(path, exemplars=0, overlays=False))
    group = zarr.open_group(store=str(path / "clusters" / "r"), mode="r+")
    del group.attrs["encoder"]  # as written before runs recorded their encoder
    store = FeatureStore.open(path)
    assert store.cluster_run_problem("r") is None
    _set_store_encoder(path, EncoderId(**{**store.encoder.__dict__, "dim": store.dim + 1}))
    problem = FeatureStore.open(path).cluster_run_problem("r")
    assert problem is not None and f"{store.dim}-d centroids" in problem


def test_an_unreadable_slide_leaves_grey_exemplars_no_overlay_and_a_warning(
    cmu_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = copy_store(cmu_store, tmp_path)
    store = FeatureStore.open(path)
    (sid,) = store.slide_ids()
    group = zarr.open_group(store=str(path / "slides" / sid), mode="r+")
    group.attrs["source_path"] = str(tmp_path / "moved-away.svs")
    assert cluster_main([str(path), "--k", "2", "--name", "r", "--exemplars", "1"]) == 0
    captured = capsys.readouterr()
    warnings = [ln for ln in captured.err.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 1 and "moved-away.svs" in warnings[0] and "left blank" in warnings[0]
    store = FeatureStore.open(path)
    assert store.cluster_runs() == ["r"]
    assert store.run_file("r", "exemplars.png") is not None
    assert store.run_file("r", f"overlays/{sid}.png") is None


# ----------------------------------------------------------------------------- ClusterFeatures


def _same_runs(a: ClusterResult, b: ClusterResult) -> None:
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.labels.keys() == b.labels.keys()
    for sid in a.labels:
        np.testing.assert_array_equal(a.labels[sid], b.labels[sid])
    assert a.exemplars == b.exemplars and a.counts == b.counts


def test_held_features_are_read_once_and_give_the_runs_a_fresh_read_gives(
    cmu_store: Path, tmp_path: Path
) -> None:
    path = copy_store(cmu_store, tmp_path)
    held = ClusterFeatures()
    first = run(_cfg(path, name="a"), features=held)
    rec = Recorder()
    second = run(_cfg(path, name="b", k=4), features=held, progress=rec)
    assert held.reads == 1 and rec.stages()[0] == "kmeans"  # no "features" stage: not read again
    # the same runs without a held table, and streamed from the store (a table over max_bytes)
    _same_runs(first, run(_cfg(path, name="a2")))
    _same_runs(second, run(_cfg(path, name="b2", k=4)))
    streamed = ClusterFeatures(max_bytes=0)
    rec = Recorder()
    _same_runs(second, run(_cfg(path, name="b3", k=4), features=streamed, progress=rec))
    assert streamed.held is None and "features" not in rec.stages()
    # exemplar pixels are kept with the table and equal to a fresh read
    e = second.exemplars[0][0]
    np.testing.assert_array_equal(held.tile(e.slide_id, e.row, e.col), second.exemplar_tiles[0][0])
    fresh = run(_cfg(path, name="b4", k=4))
    np.testing.assert_array_equal(fresh.exemplar_tiles[0][0], second.exemplar_tiles[0][0])
    assert second.failed[e.slide_id].shape == second.labels[e.slide_id].shape
    assert second.slide_attrs[e.slide_id]["source_path"] == str(cmu_store_source(path))


def cmu_store_source(path: Path) -> Path:
    store = FeatureStore.open(path)
    return store.slide(store.slide_ids()[0]).source_path


def test_held_features_are_read_again_whenever_the_store_changes(
    cmu_svs: Path, tmp_path: Path
) -> None:
    path = synthetic_store(cmu_svs, tmp_path / "f.zarr", ids=("a", "b"))
    done = zarr.open_array(store=str(path / "slides" / "a" / "done"), mode="r+")
    sf = FeatureStore.open(path).slide("a")
    later = np.argwhere(sf.selected[:32, :32] & sf.done[:32, :32])
    done[:32, :32] = False  # an extraction that has not reached chunk (0, 0) yet
    cfg = {"k": 3, "exemplars": 1, "overlays": False, "quiet": True, "overwrite": True}
    held = ClusterFeatures()

    def cluster(**kw) -> ClusterResult:
        return run(ClusterConfig(store=path, name="r", **{**cfg, **kw}), features=held)

    before = cluster()
    assert held.reads == 1 and any("not encoded yet" in w for w in before.warnings)
    assert (before.labels["a"][later[:, 0], later[:, 1]] == -1).all()
    cluster(k=4)
    assert held.reads == 1
    # the extraction goes on: the tiles are encoded
    store = FeatureStore.open(path, mode="r+")
    rng = np.random.default_rng(5)
    store.slide("a").write_tiles(
        later[:, 0], later[:, 1], rng.standard_normal((len(later), 8)).astype(np.float32)
    )
    after = cluster()
    assert held.reads == 2 and after.n_tiles == before.n_tiles + len(later)
    assert (after.labels["a"][later[:, 0], later[:, 1]] >= 0).all()
    _same_runs(after, run(ClusterConfig(store=path, name="r2", **cfg)))
    # another slide set, another normalisation: read again
    assert cluster(slides=("b",)).labels.keys() == {"b"} and held.reads == 3
    cluster(slides=("b",), normalize="none")
    assert held.reads == 4
    # slide b re-extracted with other features (its group rebuilt): read again, new features used
    cluster(slides=("b",))
    reads = held.reads
    synthetic_store(cmu_svs, tmp_path / "g.zarr", ids=("b",), seed=9)
    shutil.rmtree(path / "slides" / "b")
    shutil.copytree(tmp_path / "g.zarr" / "slides" / "b", path / "slides" / "b")
    redone = cluster(slides=("b",))
    assert held.reads == reads + 1
    _same_runs(redone, run(ClusterConfig(store=path, name="r3", slides=("b",), **cfg)))


def test_a_cancelled_read_holds_nothing(cmu_store: Path, tmp_path: Path) -> None:
    path = copy_store(cmu_store, tmp_path)
    held = ClusterFeatures()
    with pytest.raises(Cancelled):
        run(_cfg(path), features=held, progress=Recorder(cancel_at="features"))
    assert held.held is None and FeatureStore.open(path).cluster_runs() == []
    result = run(_cfg(path), features=held)
    assert held.reads == 1 and held.held is not None and held.held.n == result.n_tiles
