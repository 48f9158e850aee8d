"""engine.cluster.run: the progress protocol, Cancel and kill -9 consistency, encoder records, pictures."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from engine.cluster import ClusterConfig, run
from engine.cluster import main as cluster_main
from engine.encoder_id import EncoderId
from engine.errors import StoreError
from engine.progress import Cancelled
from engine.store import FeatureStore
from tests.engine.clustering_fixtures import copy_store, real_store

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
    assert rec.stages() == ["kmeans", "assign", "exemplars", "overlays"]
    for stage in rec.stages():
        seen = [(d, t) for s, d, t in rec.calls if s == stage]
        dones = [d for d, _ in seen]
        assert dones == sorted(dones) and dones[0] == 0  # starts at 0, never goes back
        assert seen[-1][0] == seen[-1][1] > 0  # ends at its total
    assert [t for s, _, t in rec.calls if s == "assign"][0] == result.n_tiles
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
    assert rec.stages() == ["kmeans"]
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
    from engine.cluster import ClusterConfig, run

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
