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
from engine.errors import HistoclusterError
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
    with pytest.raises(HistoclusterError, match="class name") as e:
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
    with pytest.raises(HistoclusterError, match="differ only in case"):
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
    assert export_main(again) == 2
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
        == 2
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
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_export_refuses_a_foreign_folder(
    clustered: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert (
        export_main([str(clustered), "--run", "r", "--clusters", "0", "--out", str(tmp_path)]) == 2
    )
    assert "no engine.export wrote" in capsys.readouterr().err


# ----------------------------------------------------------------------------- two-slide store


def two_slide_store(cmu_svs: Path, folder: Path) -> Path:
    """A store of slides 'a' (the CMU SVS) and 'b' (a copy of it in ``folder``), 64 px at 2 um/px.

    Random 8-d features; run 'r' (k=3) labels each tissue tile (row + col) % 3 on 'a' and
    row % 3 on 'b', so every cluster has tiles on both slides.
    """
    import shutil

    from engine.encoder_id import EncoderId
    from engine.slide import open_slide
    from engine.tiling import TileGrid

    folder.mkdir(parents=True, exist_ok=True)
    copy = folder / "b.svs"
    shutil.copy(cmu_svs, copy)
    encoder = EncoderId(
        name="synthetic", arch="resnet18", dim=8, input_px=224, mean=(0.5,) * 3, std=(0.25,) * 3
    )
    rng = np.random.default_rng(0)
    path = folder / "features.zarr"
    store = None
    labels = {}
    for sid, file in (("a", cmu_svs), ("b", copy)):
        with open_slide(file) as s:
            grid = TileGrid(s, target_mpp=2.0, tile_px=64)
            store = store or FeatureStore.create_or_open(path, encoder, grid.tiling)
            sf = store.add_slide(sid, grid)
        rows, cols = np.nonzero(sf.selected)
        sf.write_tiles(rows, cols, rng.standard_normal((len(rows), 8)).astype(np.float32))
        lab = np.full(sf.shape, -1, np.int16)
        lab[rows, cols] = ((rows + cols) if sid == "a" else rows) % 3
        labels[sid] = lab
    assert store is not None
    store = FeatureStore.open(path, mode="r+")
    store.write_cluster_run(
        "r",
        rng.standard_normal((3, 8)).astype(np.float32),
        labels,
        {"algorithm": "test", "seed": 0},
    )
    return path


@pytest.fixture(scope="module")
def two_slides(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_slide_store(cmu_svs, tmp_path_factory.mktemp("two"))


def _tiles_by_class(rows: list[dict[str, str]]) -> dict[tuple[str, int, int], str]:
    return {(r["slide_id"], int(r["row"]), int(r["col"])): r["class"] for r in rows}


def test_class_name_length_counts_utf8_bytes(tmp_path: Path) -> None:
    ok = ["é" * 127, "a" * 255]  # 254 and 255 bytes
    assert check_class_names(ok) == ok
    for name in ok:
        (tmp_path / name).mkdir()  # the file system takes them
    for bad in ("é" * 128, "a" * 256):  # 256 bytes, though only 128 characters the first
        with pytest.raises(HistoclusterError, match="256 bytes in UTF-8"):
            check_class_names([bad])


def test_cancel_after_n_patches_leaves_complete_listed_files_and_resumes(
    two_slides: Path, tmp_path: Path
) -> None:
    from engine.export import ExportConfig, run
    from engine.progress import Cancelled

    out = tmp_path / "patches"
    cfg = ExportConfig(
        store=two_slides, out=out, run="r", clusters=(0, 2), names=("x", "y"), geojson=True
    )
    calls: list[tuple[str, int, int]] = []
    n = 7

    def cancel_after(stage: str, done: int, total: int) -> None:
        calls.append((stage, done, total))
        if stage == "export" and done == n:
            raise Cancelled

    with pytest.raises(Cancelled):
        run(cfg, progress=cancel_after)
    export_calls = [c for c in calls if c[0] == "export"]
    assert [c[1] for c in export_calls] == list(range(n + 1))  # one report per patch
    total = export_calls[0][2]
    assert total > n

    rows = read_manifest(out)
    assert len(rows) == n and {r["path"] for r in rows} == _files(out)
    for r in rows:
        Image.open(out / r["path"]).verify()  # complete files only
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".partial"]
    record = json.loads((out / "export.json").read_text())
    (entry,) = record["exports"]
    assert entry["status"] == "cancelled" and entry["files"] == n
    assert sum(entry["per_class"].values()) == n
    assert set(record["classes"]) == {r["class"] for r in rows}  # no class it never reached
    listed: dict[str, dict[str, list]] = {}
    for r in rows:
        x, y, w, h = (int(r[c]) for c in ("l0_x", "l0_y", "l0_w", "l0_h"))
        listed.setdefault(r["slide_id"], {}).setdefault(r["class"], []).append(
            shapely.box(x, y, x + w, y + h)
        )
    for sid, classes in listed.items():
        shapes = read_multipolygons(out / f"{sid}.geojson")
        assert set(shapes) == set(classes)
        for name, boxes in classes.items():
            assert shapes[name].symmetric_difference(shapely.union_all(boxes)).area == 0

    stamps = {r["path"]: (out / r["path"]).stat().st_mtime_ns for r in rows}
    result = run(cfg)
    assert result.written == total - n and result.resumed == 0
    full = tmp_path / "full"
    run(ExportConfig(**{**cfg.__dict__, "out": full}))
    resumed, uninterrupted = read_manifest(out), read_manifest(full)
    assert sorted(map(sorted, (r.items() for r in resumed))) == sorted(
        map(sorted, (r.items() for r in uninterrupted))
    )
    assert {r["path"] for r in resumed} == _files(out)
    assert all((out / p).stat().st_mtime_ns == t for p, t in stamps.items())
    (entry,) = json.loads((out / "export.json").read_text())["exports"]
    assert entry["status"] == "complete" and entry["files"] == total


def test_a_manifest_row_cut_by_a_kill_is_repaired(two_slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "patches"
    args = [str(two_slides), "--run", "r", "--clusters", "1", "--out", str(out), "--quiet"]
    assert export_main(args) == 0
    complete = read_manifest(out)
    text = (out / "manifest.csv").read_bytes()
    (out / "manifest.csv").write_bytes(text[:-20])  # killed while appending the last row
    assert read_manifest(out) == complete[:-1]
    assert export_main(args) == 0  # the last file is complete: adopted, its row rewritten
    assert read_manifest(out) == complete and (out / "manifest.csv").read_bytes() == text


def test_per_slide_counts_and_geojson_per_slide(
    two_slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "patches"
    argv = [str(two_slides), "--run", "r", "--clusters", "0,1", "--names", "p,q", "--out", str(out)]
    assert export_main([*argv, "--geojson"]) == 0
    text = capsys.readouterr().out
    store = FeatureStore.open(two_slides)
    for sid in ("a", "b"):
        labels = store.read_cluster_labels("r", sid)
        want = {"p": int((labels == 0).sum()), "q": int((labels == 1).sum())}
        assert f"  {sid}: p {want['p']}, q {want['q']}" in text
        shapes = read_multipolygons(out / f"{sid}.geojson")
        assert set(shapes) == {"p", "q"}
    record = json.loads((out / "export.json").read_text())
    per_slide = record["exports"][0]["per_slide"]
    assert set(per_slide) == {"a", "b"} and per_slide["a"]["p"] > 0


def test_a_run_of_another_encoder_is_refused(
    two_slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from engine.encoder_id import EncoderId

    path = copy_store(two_slides, tmp_path)
    store = FeatureStore.open(path, mode="r+")
    other = EncoderId(
        name="other.pt", arch="resnet18", dim=8, input_px=224, mean=(0.5,) * 3, std=(0.25,) * 3,
        sha256="ab" * 32,
    )  # fmt: skip
    run = store.read_cluster_run("r")
    store.write_cluster_run("o", run.centroids, run.labels, {"encoder": other.to_attrs()})
    store.write_cluster_run(
        "same", run.centroids, run.labels, {"encoder": store.encoder.to_attrs()}
    )
    out = tmp_path / "o"
    assert export_main([str(path), "--run", "o", "--clusters", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other.pt" in err and "synthetic" in err and "recluster" in err
    assert not out.exists()
    assert export_main([str(path), "--run", "same", "--clusters", "0", "--out", str(out)]) == 0


def test_an_unreadable_slide_is_named_and_the_others_exported(
    cmu_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = two_slide_store(cmu_svs, tmp_path / "s")
    (tmp_path / "s" / "b.svs").unlink()
    out = tmp_path / "o"
    assert export_main([str(path), "--run", "r", "--clusters", "0", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "b.svs" in err and err.count("\n") == 1
    rows = read_manifest(out)
    labels = FeatureStore.open(path).read_cluster_labels("r", "a")
    assert {r["slide_id"] for r in rows} == {"a"} and len(rows) == int((labels == 0).sum())
    assert {r["path"] for r in rows} == _files(out)
    assert json.loads((out / "export.json").read_text())["exports"][0]["status"] == "incomplete"


# ----------------------------------------------------------------------------- curation


def _curate(store_path: Path) -> tuple[object, dict[tuple[str, int, int], str]]:
    """Save a curation of run 'r' with every kind of decision; return it and the expected tiles.

    Cluster 0 'ink' selected, 1 'fold' NOT selected, 2 'tissue' selected. Overrides: a tile of
    cluster 1 moved to 'ink'; a tile of cluster 0 excluded; a tile of cluster 2 moved to the new
    class 'debris'; a tile of cluster 0 moved to 'fold' (unselected: exported nowhere).
    """
    from engine.curation import Curation

    store = FeatureStore.open(store_path)
    cur = Curation.for_run(store, "r")
    for c, name, on in ((0, "ink", True), (1, "fold", False), (2, "tissue", True)):
        cur.name_cluster(c, name)
        cur.select(c, on)
    labels = {sid: store.read_cluster_labels("r", sid) for sid in ("a", "b")}

    def tile(sid: str, cluster: int, nth: int) -> tuple[int, int]:
        rows, cols = np.nonzero(labels[sid] == cluster)
        return int(rows[nth]), int(cols[nth])

    moves = {
        ("a", *tile("a", 1, 0)): "ink",
        ("a", *tile("a", 0, 0)): None,
        ("b", *tile("b", 2, 0)): "debris",
        ("b", *tile("b", 0, 1)): "fold",
    }
    for (sid, r, c), name in moves.items():
        cur.override_tile(sid, r, c, name)
    cur.save(store)
    names = {0: "ink", 2: "tissue"}
    want = {}
    for sid, lab in labels.items():
        for r, c in zip(*np.nonzero(lab >= 0), strict=True):
            key = (sid, int(r), int(c))
            name = moves[key] if key in moves else names.get(int(lab[r, c]))
            if name in ("ink", "tissue", "debris"):
                want[key] = name
    return cur, want


@pytest.fixture()
def curated(two_slides: Path, tmp_path: Path) -> tuple[Path, dict[tuple[str, int, int], str]]:
    path = copy_store(two_slides, tmp_path / "store")
    _, want = _curate(path)
    return path, want


def test_export_applies_the_saved_curation_by_default(
    curated: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path, want = curated
    out = tmp_path / "patches"
    assert export_main([str(path), "--out", str(out), "--geojson"]) == 0
    text = capsys.readouterr().out
    rows = read_manifest(out)
    assert _tiles_by_class(rows) == want  # exactly the curated tiles, each under its name
    assert {r["path"] for r in rows} == _files(out)
    assert {r["class"] for r in rows} == {"ink", "tissue", "debris"}  # never 'fold'
    moved = [r for r in rows if r["class"] == "ink" and r["cluster"] == "1"]
    assert len(moved) == 1  # the override, listed with its own cluster
    for sid in ("a", "b"):
        assert set(read_multipolygons(out / f"{sid}.geojson")) == {
            n for (s, _, _), n in want.items() if s == sid
        }
        counts = {
            n: sum(1 for (s, _, _), m in want.items() if s == sid and m == n) for n in ("ink",)
        }
        assert f"  {sid}: ink {counts['ink']}" in text
    record = json.loads((out / "export.json").read_text())
    (entry,) = record["exports"]
    assert entry["choice"]["kind"] == "curation" and entry["choice"]["overrides"] == 4
    assert record["classes"]["ink"]["sources"] == [
        {"store": str(path.resolve()), "run": "r", "cluster": 0}
    ]
    # the same curation again: nothing to do; a changed curation is another export
    assert export_main([str(path), "--out", str(out), "--quiet"]) == 0
    assert read_manifest(out) == rows


def test_a_curation_file_exports_the_same_and_clusters_still_win(
    curated: tuple[Path, dict], tmp_path: Path
) -> None:
    import shutil

    path, want = curated
    copy = tmp_path / "mine.json"
    shutil.copy(path / "clusters" / "r" / "curation.json", copy)
    out = tmp_path / "file"
    assert export_main([str(path), "--curation", str(copy), "--out", str(out), "--quiet"]) == 0
    assert _tiles_by_class(read_manifest(out)) == want
    # explicit --clusters keep their meaning even when the run has a saved curation
    plain = tmp_path / "plain"
    argv = [str(path), "--run", "r", "--clusters", "1", "--names", "fold", "--out", str(plain)]
    assert export_main([*argv, "--quiet"]) == 0
    labels = FeatureStore.open(path).read_cluster_labels("r", "a")
    assert sum(r["slide_id"] == "a" for r in read_manifest(plain)) == int((labels == 1).sum())


def test_library_export_of_an_edited_curation(curated: tuple[Path, dict], tmp_path: Path) -> None:
    from engine.curation import Curation
    from engine.export import ExportConfig, run_curation

    path, want = curated
    store = FeatureStore.open(path)
    cur = Curation.load(store, "r")
    cur.select(1, True)  # now 'fold' is exported too, with its moved tile
    out = tmp_path / "lib"
    result = run_curation(ExportConfig(store=path, out=out), cur)
    rows = read_manifest(out)
    got = _tiles_by_class(rows)
    assert {k: v for k, v in got.items() if v != "fold"} == want
    labels = {sid: store.read_cluster_labels("r", sid) for sid in ("a", "b")}
    fold = {k for k, v in got.items() if v == "fold"}
    expected_fold = {
        (sid, int(r), int(c))
        for sid, lab in labels.items()
        for r, c in zip(*np.nonzero(lab == 1), strict=True)
    }
    moved_to_ink = {k for k, v in want.items() if v == "ink" and labels[k[0]][k[1], k[2]] == 1}
    moved_to_fold = {k for k in got if got[k] == "fold" and labels[k[0]][k[1], k[2]] == 0}
    assert fold == (expected_fold - moved_to_ink) | moved_to_fold and len(moved_to_fold) == 1
    assert result.per_class == {n: sum(v == n for v in got.values()) for n in set(got.values())}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clusters", "0", "--curation", "{cur}"], "either --clusters or --curation"),
        (["--curation", "{bad}"], "not a curation JSON"),
        (["--run", "q", "--curation", "{cur}"], "a curation of run 'r', not 'q'"),
        (["--run", "q"], "has no saved curation"),
        (["--names", "a"], "--names needs --clusters"),
    ],
)
def test_curation_errors_are_one_line(
    curated: tuple[Path, dict],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    extra: list[str],
    message: str,
) -> None:
    path, _ = curated
    store = FeatureStore.open(path, mode="r+")
    run = store.read_cluster_run("r")
    store.write_cluster_run("q", run.centroids, run.labels, {})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    cur = path / "clusters" / "r" / "curation.json"
    argv = [str(path), "--out", str(tmp_path / "o")]
    argv += [a.format(cur=cur, bad=bad) for a in extra]
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_a_curation_that_selects_nothing_is_refused(
    two_slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from engine.curation import Curation

    path = copy_store(two_slides, tmp_path / "s")
    store = FeatureStore.open(path)
    cur = Curation.for_run(store, "r")
    cur.name_cluster(0, "ink")  # named, not selected
    cur.save(store)
    assert export_main([str(path), "--out", str(tmp_path / "o")]) == 2
    assert "selects no named cluster" in capsys.readouterr().err
