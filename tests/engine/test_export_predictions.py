"""python -m engine.export --predictions: a classifier trained and applied here, its confident tiles exported.

The store is the real CMU slide encoded by engine.extract (resnet18-random, 64 px at 2 um/px),
clustered at k = 4; a logistic regression is trained from named clusters and applied over the
store; the export must write exactly the tiles of the chosen predicted classes at or above
--min-prob, with the manifest, export.json and QuPath GeoJSON of a cluster export.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from engine.classify import ApplyConfig, TrainConfig, apply, train
from engine.cluster import main as cluster_main
from engine.encoder_id import EncoderId
from engine.export import MANIFEST_COLUMNS, ExportConfig, read_manifest, run
from engine.export import main as export_main
from engine.geojson import read_multipolygons
from engine.progress import Cancelled
from engine.store import FeatureStore
from tests.engine.clustering_fixtures import copy_store, real_store
from tests.engine.test_export import two_slide_store

CLASSES = ("ink=0", "crease=1", "tissue=2,3")


def _cluster(path: Path, k: int, name: str) -> None:
    args = [str(path), "--k", str(k), "--name", name, "--quiet", "--exemplars", "0"]
    assert cluster_main([*args, "--no-overlays"]) == 0


def _train_apply(path: Path, run_name: str, classes: tuple[str, ...], folder: Path) -> Path:
    """Train a classifier from named clusters of ``run_name`` and apply it as prediction 'p'."""
    result = train(
        TrainConfig(
            store=str(path), out=str(folder / "model"), run=run_name, classes=classes, folds=1
        )
    )
    apply(ApplyConfig(model=str(result.model_path), store=str(path), name="p"))
    return result.model_path


@pytest.fixture(scope="module")
def predicted(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real CMU store, clustered (k=4, run 'r'), with prediction 'p' of ink/crease/tissue."""
    folder = tmp_path_factory.mktemp("pred")
    path = copy_store(real_store(cmu_svs, tmp_path_factory), folder)
    _cluster(path, 4, "r")
    _train_apply(path, "r", CLASSES, folder)
    return path


def _truth(
    path: Path, classes: list[str], min_prob: float
) -> dict[tuple[str, int, int], tuple[str, float]]:
    """{(slide, row, col): (class, prob)} the export must write, computed from the stored maps."""
    maps = FeatureStore.open(path).prediction("p")
    want = {}
    for sid in maps.slide_ids():
        cls, prob = maps.read(sid)
        for r, c in zip(*np.nonzero(cls >= 0), strict=True):
            name = maps.classes[cls[r, c]]
            p = float(prob[r, c, cls[r, c]])
            if name in classes and p >= min_prob:
                want[(sid, int(r), int(c))] = (name, p)
    return want


def _files(out: Path) -> set[str]:
    return {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.parent != out
    }


def _rows_by_tile(rows: list[dict[str, str]]) -> dict[tuple[str, int, int], dict[str, str]]:
    return {(r["slide_id"], int(r["row"]), int(r["col"])): r for r in rows}


# ----------------------------------------------------------------------------- exports


def test_export_by_prediction_writes_exactly_the_confident_tiles(
    predicted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from torchvision.datasets import ImageFolder

    maps = FeatureStore.open(predicted).prediction("p")
    assert maps.classes == ["ink", "crease", "tissue"]
    # a threshold inside the probabilities of the two classes, so that it excludes some tiles
    loose = _truth(predicted, ["ink", "crease"], 0.0)
    threshold = round(float(np.median([p for _, p in loose.values()])), 3)
    want = _truth(predicted, ["ink", "crease"], threshold)
    assert 0 < len(want) < len(loose), (len(want), len(loose), threshold)
    per_class = {c: sum(v[0] == c for v in want.values()) for c in ("ink", "crease")}
    with capsys.disabled():
        print(
            f"\nink+crease tiles predicted: {len(loose)}, with prob >= {threshold}: {len(want)} "
            f"(per class {per_class})"
        )

    out = tmp_path / "sure"
    argv = [str(predicted), "--predictions", "p", "--classes", "ink,crease"]
    assert export_main([*argv, "--min-prob", str(threshold), "--out", str(out), "--geojson"]) == 0
    text = capsys.readouterr().out
    assert "of prediction 'p'" in text

    rows = read_manifest(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS) and "prob" in MANIFEST_COLUMNS
    with open(out / "manifest.csv", encoding="utf-8", newline="") as f:
        assert tuple(next(csv.reader(f))) == MANIFEST_COLUMNS
    got = _rows_by_tile(rows)
    assert set(got) == set(want) and len(rows) == len(want)  # exactly those tiles, each once
    assert {r["path"] for r in rows} == _files(out)
    store = FeatureStore.open(predicted)
    for tile, r in got.items():
        name, p = want[tile]
        assert r["class"] == name and float(r["prob"]) == pytest.approx(p, abs=1e-6)
        assert float(r["prob"]) >= threshold
        assert (r["run"], r["cluster"], r["distance"]) == ("", "", "")
        sf = store.slide(r["slide_id"])
        assert [int(r["l0_x"]), int(r["l0_y"])] == sf.origins[tile[1], tile[2]].tolist()
        assert r["path"] == f"{name}/{r['slide_id']}_{r['l0_x']}_{r['l0_y']}.png"
        assert r["tile_px"] == "64" and float(r["mpp"]) == 2.0
    for name in ("ink", "crease"):  # most probable first within a class
        probs = [float(r["prob"]) for r in rows if r["class"] == name]
        assert probs == sorted(probs, reverse=True)
    assert Image.open(out / rows[0]["path"]).size == (64, 64)
    ds = ImageFolder(str(out))
    assert ds.classes == sorted({v[0] for v in want.values()}) and len(ds) == len(rows)

    record = json.loads((out / "export.json").read_text())
    (entry,) = record["exports"]
    assert entry["status"] == "complete" and entry["files"] == len(rows)
    assert entry["choice"]["kind"] == "prediction" and entry["choice"]["min_prob"] == threshold
    assert entry["config"]["predictions"] == "p" and entry["config"]["run"] is None
    assert record["classes"]["ink"]["sources"] == [
        {"store": str(predicted.resolve()), "prediction": "p"}
    ]
    colours = maps.attrs["colours"]
    assert record["classes"]["ink"]["color"] == [int(colours[0][i : i + 2], 16) for i in (1, 3, 5)]

    # GeoJSON: one annotation per class, classification set, covering exactly its tiles
    (sid,) = store.slide_ids()
    data = json.loads((out / f"{sid}.geojson").read_text())
    names = [f["properties"]["classification"]["name"] for f in data["features"]]
    assert names == sorted({v[0] for v in want.values()})
    assert all(f["properties"]["objectType"] == "annotation" for f in data["features"])
    shapes = read_multipolygons(out / f"{sid}.geojson")
    for name, mp in shapes.items():
        boxes = [
            shapely.box(int(r["l0_x"]), int(r["l0_y"]), int(r["l0_x"]) + int(r["l0_w"]),
                        int(r["l0_y"]) + int(r["l0_h"]))
            for r in rows if r["class"] == name
        ]  # fmt: skip
        assert mp.symmetric_difference(shapely.union_all(boxes)).area == 0

    # the default --min-prob 0.5 and --classes (every class); --max-per-cluster caps each class
    every = tmp_path / "every"
    assert export_main([str(predicted), "--predictions", "p", "--out", str(every), "--quiet"]) == 0
    assert set(_rows_by_tile(read_manifest(every))) == set(
        _truth(predicted, ["ink", "crease", "tissue"], 0.5)
    )
    capped = tmp_path / "capped"
    assert (
        export_main([*argv, "--min-prob", "0", "--out", str(capped), "--max-per-cluster", "2"]) == 0
    )
    top = read_manifest(capped)
    for name in ("ink", "crease"):
        mine = sorted((p for (n, p) in loose.values() if n == name), reverse=True)
        assert [float(r["prob"]) for r in top if r["class"] == name] == pytest.approx(
            mine[:2], abs=1e-6
        )


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--predictions", "p", "--classes", "ink,fold"],
            "has no class 'fold' (classes: ink, crease, tissue)",
        ),
        (["--predictions", "p", "--classes", "ink,ink"], "twice"),
        (["--predictions", "p", "--min-prob", "1.5"], "from 0 to 1"),
        (["--predictions", "p", "--min-prob", "-0.1"], "from 0 to 1"),
        (["--predictions", "p", "--min-prob", "nan"], "from 0 to 1"),
        (["--predictions", "nope"], "no prediction 'nope' (predictions: p)"),
        (["--predictions", "p", "--run", "r"], "either --predictions or --run"),
        (["--predictions", "p", "--clusters", "0"], "either --predictions or --clusters"),
        (["--predictions", "p", "--curation", "c.json"], "either --predictions or --curation"),
        (["--predictions", "p", "--slides", "zz"], "prediction 'p' has no slide 'zz'"),
        (
            ["--run", "r", "--clusters", "0", "--classes", "ink"],
            "--classes chooses predicted classes",
        ),
        (["--run", "r", "--clusters", "0", "--min-prob", "0.9"], "--min-prob chooses predicted"),
    ],
)
def test_prediction_errors_are_one_line(
    predicted: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    out = tmp_path / "o"
    assert export_main([str(predicted), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_prediction_of_another_encoder_is_refused(
    predicted: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = copy_store(predicted, tmp_path)
    store = FeatureStore.open(path, mode="r+")
    attrs = store.prediction("p").attrs
    other = dataclasses.replace(store.encoder, name="other.pt", sha256="ab" * 32)
    store.create_prediction("o", {**attrs, "encoder": other.to_attrs(), "model_sha256": "x"})
    out = tmp_path / "o"
    assert export_main([str(path), "--predictions", "o", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other.pt" in err and store.encoder.name in err
    assert "differ in weights" in err and not out.exists()
    assert isinstance(EncoderId.from_attrs(attrs["encoder"]), EncoderId)
    assert export_main([str(path), "--predictions", "p", "--out", str(out), "--quiet"]) == 0


# ----------------------------------------------------------------------------- two slides


@pytest.fixture(scope="module")
def two_predicted(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The two-slide store of test_export (run 'r', k=3), with prediction 'p' of x (0) and y (1, 2)."""
    folder = tmp_path_factory.mktemp("two_pred")
    path = two_slide_store(cmu_svs, folder)
    _train_apply(path, "r", ("x=0", "y=1,2"), folder)
    return path


def test_cancel_resume_and_classes_added_to_an_old_manifest(
    two_predicted: Path, tmp_path: Path
) -> None:
    out = tmp_path / "patches"
    # an earlier cluster export into DIR whose manifest predates the prob column
    assert export_main([str(two_predicted), "--run", "r", "--clusters", "0", "--names", "c0",
                        "--out", str(out), "--quiet"]) == 0  # fmt: skip
    assert "predictions" not in ExportConfig(store=two_predicted, out=out, clusters=(0,)).to_json()
    old_cols = [c for c in MANIFEST_COLUMNS if c != "prob"]
    before = read_manifest(out)
    with open(out / "manifest.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(before)
    assert read_manifest(out) == before and all(r["prob"] == "" for r in before)  # still readable

    cfg = ExportConfig(
        store=two_predicted,
        out=out,
        predictions="p",
        classes=("x", "y"),
        min_prob=0.4,
        geojson=True,
    )
    n = 5

    def cancel_after(stage: str, done: int, total: int) -> None:
        if stage == "export" and done == n:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(cfg, progress=cancel_after)
    rows = read_manifest(out)
    with open(out / "manifest.csv", encoding="utf-8", newline="") as f:
        assert tuple(next(csv.reader(f))) == MANIFEST_COLUMNS  # rewritten to the new header
    assert rows[: len(before)] == before and len(rows) == len(before) + n
    assert {r["path"] for r in rows} == _files(out)
    entry = json.loads((out / "export.json").read_text())["exports"][1]
    assert entry["status"] == "cancelled" and entry["files"] == n

    result = run(cfg)
    assert result.prediction == "p" and result.run == ""
    full = tmp_path / "full"
    run(dataclasses.replace(cfg, out=full))
    mine = [r for r in read_manifest(out) if r["class"] in ("x", "y")]
    assert sorted(map(sorted, (r.items() for r in mine))) == sorted(
        map(sorted, (r.items() for r in read_manifest(full)))
    )
    want = _truth(two_predicted, ["x", "y"], 0.4)
    assert set(_rows_by_tile(mine)) == set(want) and {s for s, _, _ in want} == {"a", "b"}
    assert result.written == len(want) - n
    assert sum(sum(c.values()) for c in result.per_slide.values()) == len(want)
    for sid in ("a", "b"):  # GeoJSON per slide: the cluster class and the predicted ones
        shapes = read_multipolygons(out / f"{sid}.geojson")
        assert set(shapes) == {r["class"] for r in read_manifest(out) if r["slide_id"] == sid}
    record = json.loads((out / "export.json").read_text())
    assert [e["status"] for e in record["exports"]] == ["complete", "complete"]
    assert all(
        math.isnan(float(r["prob"] or "nan")) for r in read_manifest(out) if r["class"] == "c0"
    )


def test_a_slide_added_after_the_prediction_is_named_and_the_rest_exported(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from engine.slide import open_slide
    from engine.tiling import TileGrid

    path = two_slide_store(cmu_svs, tmp_path / "s")
    _train_apply(path, "r", ("x=0", "y=1,2"), tmp_path)
    store = FeatureStore.open(path, mode="r+")
    with open_slide(cmu_svs) as s:  # slide 'c' extracted after the classifier was applied
        sf = store.add_slide("c", TileGrid.from_tiling(s, store.tiling))
    rows, cols = np.nonzero(sf.selected)
    sf.write_tiles(rows, cols, np.ones((len(rows), store.dim), np.float32))
    out = tmp_path / "o"
    assert export_main([str(path), "--predictions", "p", "--min-prob", "0", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (
        err.count("warning: ") == 1
        and "has no maps for slide(s) c" in err
        and "engine.classify apply" in err
    )
    assert {r["slide_id"] for r in read_manifest(out)} == {"a", "b"}
    assert set(_rows_by_tile(read_manifest(out))) == set(_truth(path, ["x", "y"], 0.0))


def test_help_lists_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        export_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    flags = set(re.findall(r"--[a-z][a-z-]*", text))
    before = {
        "--out", "--run", "--clusters", "--names", "--curation", "--slides", "--tile-px", "--mpp",
        "--format", "--max-per-cluster", "--order", "--seed", "--geojson", "--overwrite", "--quiet",
    }  # fmt: skip
    assert before | {"--predictions", "--classes", "--min-prob"} <= flags
    for f in dataclasses.fields(ExportConfig):
        if f.name != "store":
            assert f"--{f.name.replace('_', '-')}" in flags
    assert "(default: 0.5)" in text and "STORE" in text


def test_an_unfinished_prediction_is_named_and_its_finished_chunks_exported(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A prediction whose apply stopped after the first of 3 x 3 chunks (written through the store)."""
    from tests.engine.clustering_fixtures import synthetic_store

    path = synthetic_store(cmu_svs, tmp_path / "f.zarr")
    store = FeatureStore.open(path, mode="r+")
    attrs = {
        "classes": ["x", "y"], "colours": ["#ff0000", "#00ff00"], "model_sha256": "m",
        "encoder": store.encoder.to_attrs(), "tiling": store.tiling.to_attrs(),
    }  # fmt: skip
    maps = store.create_prediction("p", attrs)
    sf = store.slide("a")
    block = sf.blocks()[0]
    sel = sf.selected[block.r0 : block.r1, block.c0 : block.c1]
    rng = np.random.default_rng(0)
    p_x = rng.uniform(0, 1, block.shape).astype(np.float32)
    cls = np.where(sel, (p_x < 0.5).astype(np.int16), -1).astype(np.int16)
    prob = np.stack([p_x, 1 - p_x], axis=-1) * sel[..., None]
    maps.write_block("a", block, cls, prob)
    assert 0 < maps.chunks_done("a").sum() < maps.chunks_done("a").size

    out = tmp_path / "o"
    argv = [str(path), "--predictions", "p", "--classes", "y", "--min-prob", "0.8"]
    assert export_main([*argv, "--out", str(out), "--max-per-cluster", "3"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: ") == 1 and "unfinished on slide(s) a" in err
    rows = read_manifest(out)
    want = _truth(path, ["y"], 0.8)
    assert len(rows) == 3 and 3 < len(want)
    best = sorted((p for _, p in want.values()), reverse=True)[:3]
    assert [float(r["prob"]) for r in rows] == pytest.approx(best, abs=1e-6)
    for r in rows:
        tile = (r["slide_id"], int(r["row"]), int(r["col"]))
        assert tile in want and block.r0 <= tile[1] < block.r1 and block.c0 <= tile[2] < block.c1
