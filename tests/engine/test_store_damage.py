"""Damage inside a feature store: one ``StoreError`` naming the damaged path and the fix, never a traceback.

Each named case is a defect a user met (issue 15.4); the fuzz test applies seeded random damage
(truncations and overwritten byte ranges of several sizes) to the files of a small real store.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError, StoreError
from engine.slide import ArraySlide
from engine.store import FeatureStore
from engine.tiling import TileGrid, Tiling

DIM = 4


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of one synthetic slide (50 x 75 tiles, 2 x 3 feature chunks) and one cluster run."""
    rng = np.random.default_rng(0)
    img = np.full((400, 600, 3), 240, np.uint8)
    img[50:350, 50:550] = (180, 60, 140)
    grid = TileGrid.from_tiling(ArraySlide(img, 1.0, "img.png"), Tiling(tile_px=8, target_mpp=1.0))
    encoder = EncoderId("synthetic", "resnet18", DIM, 224, (0.5,) * 3, (0.25,) * 3)
    out = tmp_path_factory.mktemp("pristine") / "f.zarr"
    store = FeatureStore.create_or_open(out, encoder, grid.tiling)
    sf = store.add_slide("s1", grid)
    rows, cols = np.nonzero(sf.selected)
    sf.write_tiles(rows, cols, rng.standard_normal((len(rows), DIM)).astype(np.float32))
    labels = np.where(sf.selected, rng.integers(0, 3, sf.shape), -1)
    store.write_cluster_run("k3", rng.standard_normal((3, DIM)), {"s1": labels}, {})
    return out


def read_everything(path: Path) -> None:
    """What the commands read: slides, their arrays chunk by chunk, the tissue features, cluster runs."""
    store = FeatureStore.open(path)
    for sid in store.slide_ids():
        sf = store.slide(sid)
        sf.selected, sf.done, sf.origins  # noqa: B018
        for block in sf.blocks():
            sf.read_block(block)
    for _ in store.iter_tissue_features():
        pass
    for run in store.cluster_runs():
        store.read_cluster_run(run)


def _rewrite_json(path: Path, drop: str) -> None:
    meta = json.loads(path.read_text())
    del meta[drop]
    path.write_text(json.dumps(meta))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "array metadata without data_type": (
        lambda p: _rewrite_json(p / "slides/s1/features/zarr.json", "data_type"),
        "slides/s1",
    ),
    "truncated features chunk": (
        lambda p: (p / "slides/s1/features/c/0/0/0").write_bytes(
            (p / "slides/s1/features/c/0/0/0").read_bytes()[:20]
        ),
        "slides/s1/features",
    ),
    "garbage done chunk": (
        lambda p: (p / "slides/s1/done/c/0/0").write_bytes(b"xx"),
        "slides/s1/done",
    ),
    "slides group deleted": (lambda p: shutil.rmtree(p / "slides"), "slides"),
    "tissue array deleted": (lambda p: shutil.rmtree(p / "slides/s1/tissue"), "slides/s1"),
    "labels chunk garbage": (
        lambda p: (p / "clusters/k3/slides/s1/labels/c/0/0").write_bytes(b"garbage" * 3),
        "clusters/k3",
    ),
    "centroids metadata not JSON": (
        lambda p: (p / "clusters/k3/centroids/zarr.json").write_text("{"),
        "clusters/k3",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_one_store_error_naming_the_path(
    case: str, pristine: Path, tmp_path: Path
) -> None:
    damage, where = CASES[case]
    path = tmp_path / "f.zarr"
    shutil.copytree(pristine, path)
    damage(path)
    with pytest.raises(StoreError) as info:
        read_everything(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path / where) in message
    assert "delete" in message or "re-extract" in message


def test_slide_with_unreadable_group_metadata_is_named_and_rebuilt(
    pristine: Path, tmp_path: Path
) -> None:
    path = tmp_path / "f.zarr"
    shutil.copytree(pristine, path)
    (path / "slides/s1/zarr.json").write_text("{not json")
    store = FeatureStore.open(path, mode="r+")
    assert store.slide_ids() == []
    assert list(store.damaged_slides()) == ["s1"]
    assert str(path / "slides/s1") in store.damaged_slides()["s1"]
    with pytest.raises(StoreError, match="slides/s1"):
        store.slide("s1")
    img = np.full((400, 600, 3), 240, np.uint8)
    img[50:350, 50:550] = (180, 60, 140)
    grid = TileGrid.from_tiling(ArraySlide(img, 1.0, "img.png"), store.tiling)
    rebuilt = store.add_slide("s1", grid)
    assert rebuilt.n_encoded() == 0 and rebuilt.selected.sum() > 0
    assert store.damaged_slides() == {}


def test_missing_clusters_group_reads_as_no_runs(pristine: Path, tmp_path: Path) -> None:
    path = tmp_path / "f.zarr"
    shutil.copytree(pristine, path)
    shutil.rmtree(path / "clusters")
    assert FeatureStore.open(path).cluster_runs() == []
    with pytest.raises(HistoclusterError, match="no cluster run"):
        FeatureStore.open(path).read_cluster_run("k3")
    assert FeatureStore.open(path, mode="r+").cluster_runs() == []
    assert (path / "clusters" / "zarr.json").is_file()


def _damage_at_random(path: Path, rng: np.random.Generator) -> str:
    files = sorted(f for f in path.rglob("*") if f.is_file())
    target = files[rng.integers(len(files))]
    data = bytearray(target.read_bytes())
    kind = rng.choice(["truncate", "overwrite"])
    if kind == "truncate" or not data:
        cut = int(rng.integers(0, max(1, len(data))))
        target.write_bytes(bytes(data[:cut]))
        return f"{target.relative_to(path)} truncated to {cut}"
    size = int(rng.choice([1, 8, 64, 4096]))
    start = int(rng.integers(0, len(data)))
    data[start : start + size] = rng.integers(
        0, 256, min(size, len(data) - start), dtype=np.uint8
    ).tobytes()
    target.write_bytes(bytes(data))
    return f"{target.relative_to(path)} overwritten at {start} ({size} bytes)"


@pytest.mark.parametrize("seed", range(60))
def test_fuzzed_store_never_raises_a_traceback(seed: int, pristine: Path, tmp_path: Path) -> None:
    """Seeded random damage: reading works (damage in a byte that does not matter) or fails with one
    line that names a path inside the store; nothing else escapes."""
    rng = np.random.default_rng(seed)
    path = tmp_path / "f.zarr"
    shutil.copytree(pristine, path)
    what = _damage_at_random(path, rng)
    try:
        read_everything(path)
    except HistoclusterError as e:
        message = str(e)
        assert "\n" not in message, what
        assert str(path) in message, (what, message)
