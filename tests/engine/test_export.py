"""python -m engine.export on the real CMU slide: files, manifest, GeoJSON, resume, class names."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image

from engine.cluster import main as cluster_main
from engine.export import MANIFEST_COLUMNS, check_class_names, read_manifest, tile_geometry
from engine.export import main as export_main
from engine.geojson import read_multipolygons
from engine.store import FeatureStore
from engine.tiling import Tiling
from tests.engine.clustering_fixtures import copy_store, real_store

K = 4


@pytest.fixture(scope="module")
def clustered(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the CMU store with cluster runs 'r' (k=4) and 'q' (k=3)."""
    path = copy_store(real_store(cmu_svs, tmp_path_factory), tmp_path_factory.mktemp("exp"))
    for name, k in (("r", K), ("q", 3)):
        assert (
            cluster_main(
                [
                    str(path),
                    "--k",
                    str(k),
                    "--name",
                    name,
                    "--quiet",
                    "--exemplars",
                    "0",
                    "--no-overlays",
                ]
            )
            == 0
        )
    return path


def _files(out: Path) -> set[str]:
    return {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.parent != out
    }


def _labels(store_path: Path, run: str) -> tuple[str, np.ndarray]:
    store = FeatureStore.open(store_path)
    (sid,) = store.slide_ids()
    return sid, store.read_cluster_labels(run, sid)


# ----------------------------------------------------------------------------- class names


@pytest.mark.parametrize(
    "names, message",
    [
        ([""], "empty"),
        (["  "], "empty"),
        (["a/b"], "path separator"),
        (["a\\b"], "path separator"),
        (["..", "x"], "'..'"),
        (["up..down"], "'..'"),
        ([".hidden"], "starts with '.'"),
        (["ink", "Ink"], "differ only in case"),
        (["a:b"], "not allowed"),
        (["ink "], "trailing"),
        (["manifest.csv"], "collide"),
        (["slide.geojson"], "collide"),
    ],
)
def test_bad_class_names_are_refused(names: list[str], message: str) -> None:
    with pytest.raises(ValueError, match="class name") as e:
        check_class_names(names)
    assert message in str(e.value) and "—" in str(e.value)


def test_good_class_names_pass_and_case_clashes_with_dir_are_caught() -> None:
    assert check_class_names(["ink", "fold-1", "squamous_epi", "ink"]) == [
        "ink",
        "fold-1",
        "squamous_epi",
        "ink",
    ]
    assert check_class_names(["ink"], existing=["ink", "fold"]) == ["ink"]  # same class adds up
    with pytest.raises(ValueError, match="differ only in case"):
        check_class_names(["Fold"], existing=["ink", "fold"])


def test_tile_geometry_keeps_physical_size_unless_both_are_given() -> None:
    tiling = Tiling(tile_px=64, target_mpp=2.0)
    assert tile_geometry(tiling, None, None) == (64, 2.0)
    assert tile_geometry(tiling, 128, None) == (128, 1.0)
    assert tile_geometry(tiling, None, 4.0) == (32, 4.0)
    assert tile_geometry(tiling, 100, 0.5) == (100, 0.5)


# ----------------------------------------------------------------------------- exports


def test_export_writes_imagefolder_manifest_and_geojson(
    clustered: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from torchvision.datasets import ImageFolder

    out = tmp_path / "patches"
    assert (
        export_main(
            [
                str(clustered),
                "--run",
                "r",
                "--clusters",
                "0,2",
                "--names",
                "alpha,beta",
                "--out",
                str(out),
                "--geojson",
            ]
        )
        == 0
    )
    assert "wrote" in capsys.readouterr().out
    sid, labels = _labels(clustered, "r")
    store = FeatureStore.open(clustered)
    sf = store.slide(sid)

    rows = read_manifest(out)
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    assert {r["path"] for r in rows} == _files(out) and len(rows) == len(
        _files(out)
    )  # rows == files
    for name, c in (("alpha", 0), ("beta", 2)):
        mine = [r for r in rows if r["class"] == name]
        assert len(mine) == int((labels == c).sum()) > 0
        assert {(int(r["row"]), int(r["col"])) for r in mine} == set(
            zip(*np.nonzero(labels == c), strict=True)
        )
    for r in rows:
        assert r["path"] == f"{r['class']}/{sid}_{r['l0_x']}_{r['l0_y']}.png"
        assert [int(r["l0_x"]), int(r["l0_y"])] == sf.origins[int(r["row"]), int(r["col"])].tolist()
        assert (r["cluster"], r["run"], r["slide_id"], r["tile_px"], float(r["mpp"])) == (
            r["cluster"],
            "r",
            sid,
            "64",
            2.0,
        )
        assert Path(r["slide_path"]) == sf.source_path and r["level"] == "0"
    img = np.asarray(Image.open(out / rows[0]["path"]))
    assert img.shape == (64, 64, 3)
    with sf_slide(sf) as slide:
        ref = slide.read_tile_at_mpp((int(rows[0]["l0_x"]), int(rows[0]["l0_y"])), 2.0, 64)
    np.testing.assert_array_equal(img, ref)  # read afresh from the slide, lossless PNG

    # rows are nearest-first within each cluster, distances to the l2-normalised centroid
    run = store.read_cluster_run("r", slide_ids=[])
    for name, c in (("alpha", 0), ("beta", 2)):
        mine = [r for r in rows if r["class"] == name]
        d = [float(r["distance"]) for r in mine]
        assert d == sorted(d)
        f = sf.read_tiles(np.array([int(mine[0]["row"])]), np.array([int(mine[0]["col"])]))[0]
        assert d[0] == pytest.approx(
            float(np.linalg.norm(f / np.linalg.norm(f) - run.centroids[c])), abs=1e-5
        )

    ds = ImageFolder(str(out))
    assert ds.classes == ["alpha", "beta"] and len(ds) == len(rows)

    record = json.loads((out / "export.json").read_text())
    (entry,) = record["exports"]
    assert (
        entry["status"] == "complete"
        and entry["config"]["clusters"] == [0, 2]
        and entry["files"] == len(rows)
    )
    assert record["classes"]["alpha"]["sources"] == [
        {"store": str(clustered.resolve()), "run": "r", "cluster": 0}
    ]

    # GeoJSON: one MultiPolygon per class covering exactly the exported tiles
    data = json.loads((out / f"{sid}.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    assert [f["properties"]["classification"]["name"] for f in data["features"]] == [
        "alpha",
        "beta",
    ]
    assert all(f["properties"]["objectType"] == "annotation" for f in data["features"])
    shapes = read_multipolygons(out / f"{sid}.geojson")
    for name, mp in shapes.items():
        assert isinstance(mp, shapely.MultiPolygon) and mp.is_valid
        boxes = [
            shapely.box(
                int(r["l0_x"]),
                int(r["l0_y"]),
                int(r["l0_x"]) + int(r["l0_w"]),
                int(r["l0_y"]) + int(r["l0_h"]),
            )
            for r in rows
            if r["class"] == name
        ]
        tiles = shapely.union_all(boxes)
        assert mp.symmetric_difference(tiles).area == 0
        assert mp.area == sum(b.area for b in boxes)  # grid tiles do not overlap
        # each tile's true (fractional) extent is inside, up to the whole-pixel snapping
        for r in (r for r in rows if r["class"] == name):
            x, y, side = int(r["l0_x"]), int(r["l0_y"]), sf.attrs["tile_l0"][0]
            assert mp.covers(shapely.box(x + 1, y + 1, x + side - 1, y + side - 1))
            assert abs(int(r["l0_w"]) - side) < 1 and abs(int(r["l0_h"]) - side) < 1
    assert shapes["alpha"].intersection(shapes["beta"]).area == 0


def sf_slide(sf):
    from engine.slide import open_slide

    return open_slide(sf.source_path, mpp=tuple(sf.attrs["mpp"]))


def test_classes_add_up_and_nothing_is_overwritten(
    clustered: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "patches"
    sid, r_labels = _labels(clustered, "r")
    _, q_labels = _labels(clustered, "q")
    ink, fold = (int(c) for c in np.argsort(-np.bincount(r_labels[r_labels >= 0], minlength=K))[:2])
    q_ink = int(np.argmax(np.bincount(q_labels[r_labels == ink], minlength=3)))  # overlaps r's ink
    assert (
        export_main(
            [
                str(clustered),
                "--run",
                "r",
                "--clusters",
                str(ink),
                "--names",
                "ink",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        export_main(
            [
                str(clustered),
                "--run",
                "r",
                "--clusters",
                str(fold),
                "--names",
                "fold",
                "--out",
                str(out),
                "--quiet",
                "--geojson",
            ]
        )
        == 0
    )
    rows = read_manifest(out)
    assert {r["path"] for r in rows} == _files(out)
    assert sum(r["class"] == "ink" for r in rows) == (r_labels == ink).sum()
    assert sum(r["class"] == "fold" for r in rows) == (r_labels == fold).sum()
    features = json.loads((out / f"{sid}.geojson").read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in features} == {"ink", "fold"}

    # the same class from another run: tiles already in DIR/ink are not overwritten silently
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = [
        str(clustered),
        "--run",
        "q",
        "--clusters",
        str(q_ink),
        "--names",
        "ink",
        "--out",
        str(out),
        "--quiet",
    ]
    assert export_main(again) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before and read_manifest(
        out
    ) == rows
    assert export_main([*again, "--overwrite"]) == 0
    rows = read_manifest(out)
    assert {r["path"] for r in rows} == _files(out) and len(rows) == len(_files(out))
    got = {(r["row"], r["col"]) for r in rows if r["class"] == "ink"}
    want = (r_labels == ink) | (q_labels == q_ink)
    assert got == {(str(a), str(b)) for a, b in zip(*np.nonzero(want), strict=True)}
    assert (
        json.loads((out / "export.json").read_text())["classes"]["ink"]["sources"][1]["run"] == "q"
    )
    # a class differing only in case from one in DIR is refused
    assert (
        export_main(
            [
                str(clustered),
                "--run",
                "r",
                "--clusters",
                "0",
                "--names",
                "INK",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 1
    )
    assert "differ only in case" in capsys.readouterr().err


def test_interrupted_export_resumes(clustered: Path, tmp_path: Path) -> None:
    out = tmp_path / "patches"
    args = [str(clustered), "--run", "r", "--clusters", "0,1,2,3", "--out", str(out), "--quiet"]
    assert export_main(args) == 0
    complete = read_manifest(out)
    assert len(complete) >= 8
    # Make DIR look killed mid-way: the last rows never reached the manifest (their files did,
    # or not at all), one file is half-written, and export.json still says "running".
    kept, lost = complete[:-6], complete[-6:]
    for r in lost[3:]:
        (out / r["path"]).unlink()
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(kept)
    (out / (lost[-1]["path"] + ".partial")).write_bytes(b"\x89PNG half")
    record = json.loads((out / "export.json").read_text())
    record["exports"][0]["status"] = "running"
    (out / "export.json").write_text(json.dumps(record))
    stamps = {r["path"]: (out / r["path"]).stat().st_mtime_ns for r in kept}

    assert export_main(args) == 0
    rows = read_manifest(out)
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in complete)
    assert {r["path"] for r in rows} == _files(out)
    assert not list(out.rglob("*.partial"))
    assert all((out / p).stat().st_mtime_ns == t for p, t in stamps.items())  # done files untouched
    assert json.loads((out / "export.json").read_text())["exports"][0]["status"] == "complete"
    for r in lost:
        Image.open(out / r["path"]).verify()


def test_max_per_cluster_order_and_tile_size(clustered: Path, tmp_path: Path) -> None:
    sid, labels = _labels(clustered, "r")
    big = int(np.argmax(np.bincount(labels[labels >= 0])))
    near, rand1, rand2 = tmp_path / "near", tmp_path / "rand1", tmp_path / "rand2"
    base = [
        str(clustered),
        "--run",
        "r",
        "--clusters",
        str(big),
        "--names",
        "c",
        "--max-per-cluster",
        "3",
        "--quiet",
    ]
    assert export_main([*base, "--out", str(near)]) == 0
    assert (
        export_main(
            [
                *base,
                "--out",
                str(rand1),
                "--order",
                "random",
                "--seed",
                "5",
                "--tile-px",
                "32",
                "--format",
                "jpg",
            ]
        )
        == 0
    )
    assert (
        export_main(
            [
                *base,
                "--out",
                str(rand2),
                "--order",
                "random",
                "--seed",
                "5",
                "--tile-px",
                "32",
                "--format",
                "jpg",
            ]
        )
        == 0
    )
    n_rows = read_manifest(near)
    assert len(n_rows) == 3
    full = tmp_path / "full"
    assert (
        export_main(
            [
                str(clustered),
                "--run",
                "r",
                "--clusters",
                str(big),
                "--names",
                "c",
                "--out",
                str(full),
                "--quiet",
            ]
        )
        == 0
    )
    all_d = sorted(float(r["distance"]) for r in read_manifest(full))
    assert [float(r["distance"]) for r in n_rows] == all_d[:3]
    r1, r2 = read_manifest(rand1), read_manifest(rand2)
    assert [r["path"] for r in r1] == [r["path"] for r in r2] and len(r1) == 3
    assert all(
        r["path"].endswith(".jpg") and r["tile_px"] == "32" and float(r["mpp"]) == 4.0 for r in r1
    )
    assert Image.open(rand1 / r1[0]["path"]).size == (32, 32)
    # --mpp and --tile-px together: a larger region centred on the grid tile
    ctx = tmp_path / "ctx"
    assert export_main([*base, "--out", str(ctx), "--tile-px", "64", "--mpp", "4.0"]) == 0
    c_rows, n_by_rc = read_manifest(ctx), {(r["row"], r["col"]): r for r in n_rows}
    for r in c_rows:
        n = n_by_rc[(r["row"], r["col"])]
        assert int(r["l0_w"]) == pytest.approx(2 * int(n["l0_w"]), abs=1)
        assert int(r["l0_x"]) == pytest.approx(int(n["l0_x"]) - int(n["l0_w"]) / 2, abs=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clusters", "9"], "has clusters 0..3"),
        (["--clusters", "0,1", "--names", "a"], "one name per cluster"),
        (["--clusters", "0", "--names", "../x"], "path separator"),
        (["--clusters", "0", "--run", "nope"], "no cluster run 'nope'"),
        (["--clusters", "0,0"], "twice"),
    ],
)
def test_export_errors_are_one_line(
    clustered: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    argv = [str(clustered), "--out", str(tmp_path / "o"), *args]
    if "--run" not in args:
        argv += ["--run", "r"]
    assert export_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_foreign_folder(
    clustered: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert (
        export_main([str(clustered), "--run", "r", "--clusters", "0", "--out", str(tmp_path)]) == 1
    )
    assert "no engine.export wrote" in capsys.readouterr().err
