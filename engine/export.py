"""``python -m engine.export``: the tiles of chosen clusters as a labelled patch set.

Writes, under ``--out DIR``::

    DIR/<class>/<slide_id>_<l0_x>_<l0_y>.png   tiles read afresh from the slides (ImageFolder layout)
    DIR/manifest.csv                           one row per file (see MANIFEST_COLUMNS)
    DIR/export.json                            every export into DIR: configuration, classes, status
    DIR/<slide_id>.geojson                     with --geojson: a MultiPolygon per class (QuPath)

Several exports can go into one DIR: classes add up (the same class name gathers tiles from
several clusters or runs). A file that exists is never overwritten without ``--overwrite``. An
interrupted export resumes when run again with the same arguments: files are written under a
``.partial`` name and renamed, and a manifest row is appended after each file.

Tile geometry: by default a tile is the grid tile the features came from (the store's
``tile_px`` at its ``target_mpp``). ``--tile-px`` alone keeps that physical size at another
pixel size; ``--mpp`` alone keeps it at another resolution; both together give a region of
``tile_px x mpp`` micrometres centred on the grid tile.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.errors import HistoclusterError
from engine.tiling import Tiling

MANIFEST = "manifest.csv"
EXPORT_JSON = "export.json"
PARTIAL = ".partial"
MANIFEST_COLUMNS = (
    "path", "class", "cluster", "run", "slide_path", "slide_id", "row", "col",
    "l0_x", "l0_y", "l0_w", "l0_h", "level", "mpp", "tile_px", "distance", "export",
)  # fmt: skip
_RESERVED = {MANIFEST.lower(), EXPORT_JSON.lower()}
_BAD_CHARS = re.compile(r'[<>:"|?*\x00-\x1f\x7f]')


def check_class_names(names: Sequence[str], existing: Iterable[str] = ()) -> list[str]:
    """Validate class names (folder names under DIR); returns them unchanged.

    Refused, with a message saying why: empty names, path separators, ``..``, a leading dot,
    characters Windows forbids, leading/trailing spaces, names of DIR's own files, and names that
    differ only in case from one another or from a class already in DIR (``existing``), since a
    case-insensitive file system would merge their folders.

    Raises:
        ValueError: the first bad name, with the fix.
    """
    seen: dict[str, str] = {n.lower(): n for n in existing}
    for name in names:
        shown = repr(name)
        if not name or not name.strip():
            raise ValueError(f"class name {shown} is empty — give every class a name with --names")
        if "/" in name or "\\" in name:
            raise ValueError(
                f"class name {shown} contains a path separator — use a plain folder name"
            )
        if ".." in name:
            raise ValueError(f"class name {shown} contains '..' — use a plain folder name")
        if name.startswith("."):
            raise ValueError(f"class name {shown} starts with '.' (a hidden folder) — drop the dot")
        if _BAD_CHARS.search(name):
            raise ValueError(
                f'class name {shown} contains a character not allowed in folder names (<>:"|?* or control) — remove it'
            )
        if name != name.strip() or name.endswith("."):
            raise ValueError(
                f"class name {shown} has leading/trailing spaces or a trailing dot — remove them"
            )
        if name.lower() in _RESERVED or name.lower().endswith((".geojson", PARTIAL)):
            raise ValueError(
                f"class name {shown} would collide with the export's own files — choose another name"
            )
        if len(name) > 120:
            raise ValueError(
                f"class name {shown[:40]}... is longer than 120 characters — shorten it"
            )
        other = seen.get(name.lower())
        if other is not None and other != name:
            raise ValueError(
                f"class names {other!r} and {shown} differ only in case — use one spelling"
            )
        seen[name.lower()] = name
    return list(names)


@dataclass
class ExportConfig:
    """``python -m engine.export`` arguments (see ``--help``)."""

    store: Path
    clusters: list[int]
    out: Path
    run: str | None = None
    names: list[str] = field(default_factory=list)
    slides: list[str] = field(default_factory=list)
    tile_px: int | None = None
    mpp: float | None = None
    format: Literal["png", "jpg"] = "png"
    max_per_cluster: int = 0
    order: Literal["nearest", "random"] = "nearest"
    seed: int = 0
    geojson: bool = False
    overwrite: bool = False
    quiet: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["store"] = str(Path(self.store).resolve())
        d["out"] = str(Path(self.out).resolve())
        return d

    def signature(self) -> str:
        """Short id of what decides the files (not --out/--overwrite/--quiet/--geojson)."""
        d = self.to_json()
        for key in ("out", "overwrite", "quiet", "geojson"):
            d.pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class PlannedTile:
    """One file to write."""

    path: str  # relative to DIR, '/'-separated
    cls: str
    cluster: int
    slide_id: str
    row: int
    col: int
    l0_x: int
    l0_y: int
    l0_w: int
    l0_h: int
    distance: float


@dataclass
class ExportResult:
    """Counts of one export: files written now, already there from an interrupted run, per class."""

    written: int = 0
    resumed: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    geojson: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def tile_geometry(
    tiling: Tiling, tile_px: int | None, mpp: float | None
) -> tuple[int, float]:
    """(tile_px, mpp) of the exported tiles from the store's tiling and the optional overrides."""
    store_px, store_mpp = tiling.tile_px, tiling.target_mpp
    side_um = store_px * store_mpp
    if tile_px is None and mpp is None:
        return store_px, store_mpp
    if mpp is None:
        return int(tile_px), side_um / int(tile_px)  # type: ignore[arg-type]
    if tile_px is None:
        return max(1, round(side_um / mpp)), float(mpp)
    return int(tile_px), float(mpp)


def tile_boxes(
    rows: np.ndarray,
    cols: np.ndarray,
    stride_l0: Sequence[float],
    tile_l0: Sequence[float],
    region_l0: Sequence[float],
) -> np.ndarray:
    """(n, 4) int64 level-0 (x0, y0, x1, y1) of regions of ``region_l0`` centred on grid tiles.

    Corners are rounded from the continuous grid position, so with region == stride neighbours
    share edges exactly (x1 of one tile is x0 of the next) and the union has no slivers.
    """
    rows, cols = np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)
    fx = cols * stride_l0[0] + (tile_l0[0] - region_l0[0]) / 2
    fy = rows * stride_l0[1] + (tile_l0[1] - region_l0[1]) / 2
    return np.stack(
        [np.rint(fx), np.rint(fy), np.rint(fx + region_l0[0]), np.rint(fy + region_l0[1])], axis=1
    ).astype(np.int64)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HistoclusterError(
            f"{path}: unreadable ({e}) — fix or remove it, or choose another --out"
        ) from e


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + PARTIAL)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def read_manifest(out: Path) -> list[dict[str, str]]:
    """Rows of ``DIR/manifest.csv`` (empty when absent)."""
    path = out / MANIFEST
    if not path.exists():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise HistoclusterError(f"{path}: not an engine.export manifest — choose another --out")
        return list(reader)


def _rewrite_manifest(out: Path, rows: list[dict[str, str]]) -> None:
    tmp = out / (MANIFEST + PARTIAL)
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out / MANIFEST)


def _existing_classes(out: Path, record: dict[str, Any]) -> list[str]:
    names = set(record.get("classes", {}))
    if out.is_dir():
        names |= {p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    return sorted(names)


def plan_export(
    store: Any, cfg: ExportConfig, run: str, names: list[str]
) -> tuple[list[PlannedTile], dict[str, Any]]:
    """The files of this export, per cluster ordered and capped, and the slide facts they need."""
    from engine.kmeans import l2_normalize

    stored = store.read_cluster_run(run, slide_ids=[])
    cr_attrs = stored.attrs
    centroids = np.asarray(stored.centroids, dtype=np.float32)
    normalize = cr_attrs.get("normalize", "l2")
    run_slides = list(cr_attrs.get("slides", []))
    slides = sorted(set(cfg.slides)) if cfg.slides else run_slides
    unknown = [s for s in slides if s not in run_slides]
    if unknown:
        raise HistoclusterError(
            f"{store.path}: cluster run {run!r} has no slide {', '.join(map(repr, unknown))} (slides: {', '.join(run_slides)}) — check --slides"
        )
    tile_px, mpp = tile_geometry(store.tiling, cfg.tile_px, cfg.mpp)
    cluster_to_name = dict(zip(cfg.clusters, names, strict=True))
    candidates: dict[int, list[tuple[float, int, int, int]]] = {c: [] for c in cfg.clusters}
    facts: dict[str, dict[str, Any]] = {}
    for si, sid in enumerate(slides):
        sf = store.slide(sid)
        attrs = sf.attrs
        slide_mpp = attrs["mpp"]
        region_l0 = (tile_px * mpp / slide_mpp[0], tile_px * mpp / slide_mpp[1])
        facts[sid] = {"attrs": attrs, "region_l0": region_l0}
        labels = store.read_cluster_labels(run, sid)
        mask = np.isin(labels, cfg.clusters)
        rows, cols = np.nonzero(mask)
        if len(rows) == 0:
            continue
        feats = sf.read_tiles(rows, cols)
        if normalize == "l2":
            feats = l2_normalize(feats)
        lab = labels[rows, cols].astype(np.int64)
        dist = np.linalg.norm(feats - centroids[lab], axis=1)
        for c in cfg.clusters:
            sel = lab == c
            candidates[c].extend(
                zip(
                    dist[sel].tolist(),
                    [si] * int(sel.sum()),
                    rows[sel].tolist(),
                    cols[sel].tolist(),
                    strict=True,
                )
            )
    rng = np.random.default_rng(cfg.seed)
    ext = "jpg" if cfg.format == "jpg" else "png"
    plan: list[PlannedTile] = []
    for c in cfg.clusters:
        items = sorted(candidates[c])  # nearest first; ties by slide, row, col
        if cfg.order == "random":
            items = [items[i] for i in rng.permutation(len(items))]
        if cfg.max_per_cluster:
            items = items[: cfg.max_per_cluster]
        by_slide: dict[int, list[tuple[float, int, int]]] = {}
        for d, si, r, col in items:
            by_slide.setdefault(si, []).append((d, r, col))
        placed: dict[tuple[int, int, int], PlannedTile] = {}
        for si, tiles in by_slide.items():
            sid = slides[si]
            a = facts[sid]["attrs"]
            rr = np.array([t[1] for t in tiles])
            cc = np.array([t[2] for t in tiles])
            boxes = tile_boxes(rr, cc, a["stride_l0"], a["tile_l0"], facts[sid]["region_l0"])
            for (d, r, col), (x0, y0, x1, y1) in zip(tiles, boxes.tolist(), strict=True):
                name = cluster_to_name[c]
                placed[(si, r, col)] = PlannedTile(
                    f"{name}/{sid}_{x0}_{y0}.{ext}",
                    name,
                    c,
                    sid,
                    r,
                    col,
                    x0,
                    y0,
                    x1 - x0,
                    y1 - y0,
                    d,
                )
        plan.extend(placed[(si, r, col)] for _, si, r, col in items)
    return plan, {
        "tile_px": tile_px,
        "mpp": mpp,
        "facts": facts,
        "centroids_k": len(centroids),
        "attrs": cr_attrs,
    }


def run_export(store: Any, cfg: ExportConfig, progress: bool = False) -> ExportResult:
    """Export ``cfg.clusters`` of a cluster run of ``store`` into ``cfg.out``; see the module doc."""
    from engine.mosaic import cluster_colors
    from engine.slide import open_slide
    from engine.store import file_fingerprint

    out = Path(cfg.out)
    run = cfg.run or store.latest_cluster_run()
    if run is None:
        raise HistoclusterError(
            f"{store.path}: holds no cluster runs — run python -m engine.cluster first"
        )
    attrs = store.read_cluster_run(run, slide_ids=[]).attrs
    k = int(attrs["k"])
    if not cfg.clusters:
        raise HistoclusterError(f"{store.path}: no clusters chosen — pass --clusters 3,5")
    bad = [c for c in cfg.clusters if not 0 <= c < k]
    if bad:
        raise HistoclusterError(
            f"{store.path}: cluster run {run!r} has clusters 0..{k - 1}, not {bad} — fix --clusters"
        )
    if len(set(cfg.clusters)) != len(cfg.clusters):
        raise HistoclusterError(f"{store.path}: --clusters lists a cluster twice — list each once")
    names = list(cfg.names) if cfg.names else [f"{run}_c{c}" for c in cfg.clusters]
    if len(names) != len(cfg.clusters):
        raise HistoclusterError(
            f"{out}: {len(cfg.clusters)} clusters but {len(names)} --names — give one name per cluster"
        )
    if (
        cfg.max_per_cluster < 0
        or (cfg.tile_px is not None and cfg.tile_px < 1)
        or (cfg.mpp is not None and cfg.mpp <= 0)
    ):
        raise HistoclusterError(
            f"{out}: --max-per-cluster, --tile-px and --mpp must be positive — fix the value"
        )
    if out.exists() and not out.is_dir():
        raise HistoclusterError(f"{out}: exists and is not a directory — choose another --out")
    record_path = out / EXPORT_JSON
    record = (
        _load_json(record_path)
        if record_path.exists()
        else {"format": "histocluster-export", "version": 1, "classes": {}, "exports": []}
    )
    if out.is_dir() and any(out.iterdir()) and not record_path.exists():
        raise HistoclusterError(
            f"{out}: is a non-empty folder that no engine.export wrote — choose another --out"
        )
    try:
        check_class_names(names, _existing_classes(out, record))
    except ValueError as e:
        raise HistoclusterError(f"{out}: {e}") from None

    plan, geo = plan_export(store, cfg, run, names)
    key = cfg.signature()
    started_before = any(e.get("id") == key for e in record["exports"])
    manifest = read_manifest(out)
    listed = {row["path"]: row for row in manifest}

    todo: list[PlannedTile] = []
    adopt: list[PlannedTile] = []
    replace: set[str] = set()
    conflicts: list[str] = []
    for t in plan:
        file = out / t.path
        row = listed.get(t.path)
        exists = file.exists()
        if exists and row is not None and row.get("export") == key:
            continue  # done by this export before
        if exists and row is None and started_before:
            adopt.append(t)  # written just before an interruption, manifest row missing
            continue
        if exists or row is not None:
            if exists and not cfg.overwrite:
                conflicts.append(t.path)
                continue
            replace.add(t.path)
        todo.append(t)
    if conflicts:
        raise HistoclusterError(
            f"{out / conflicts[0]}: exists from an earlier export ({len(conflicts)} such file(s)) — pass --overwrite to replace them, or choose another --out"
        )

    # Record the export before writing anything, so an interruption can be resumed.
    colors = attrs.get("colors") or cluster_colors(k).tolist()
    classes = record.setdefault("classes", {})
    for c, name in zip(cfg.clusters, names, strict=True):
        entry = classes.setdefault(name, {"color": [int(v) for v in colors[c]], "sources": []})
        src = {"store": str(Path(cfg.store).resolve()), "run": run, "cluster": c}
        if src not in entry["sources"]:
            entry["sources"].append(src)
    entry = next((e for e in record["exports"] if e.get("id") == key), None)
    if entry is None:
        entry = {"id": key}
        record["exports"].append(entry)
    entry.update(
        {
            "config": {**cfg.to_json(), "run": run, "names": names},
            "tile_px": geo["tile_px"],
            "mpp": geo["mpp"],
            "status": "running",
            "started": _now(),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    _write_json(record_path, record)

    if replace:
        manifest = [r for r in manifest if r["path"] not in replace]
        _rewrite_manifest(out, manifest)
    for d in {out / t.cls for t in plan}:
        if d.is_dir():
            for stale in d.glob(f"*{PARTIAL}"):
                stale.unlink()

    result = ExportResult(resumed=len(adopt))
    facts = geo["facts"]
    tile_px, mpp = geo["tile_px"], geo["mpp"]
    slide_paths = {sid: facts[sid]["attrs"]["source_path"] for sid in facts}
    opened: dict[str, Any] = {}
    levels: dict[str, int] = {}

    def row_of(t: PlannedTile) -> dict[str, Any]:
        return {
            "path": t.path, "class": t.cls, "cluster": t.cluster, "run": run,
            "slide_path": slide_paths[t.slide_id], "slide_id": t.slide_id, "row": t.row, "col": t.col,
            "l0_x": t.l0_x, "l0_y": t.l0_y, "l0_w": t.l0_w, "l0_h": t.l0_h, "level": levels.get(t.slide_id, ""),
            "mpp": f"{mpp:.6g}", "tile_px": tile_px, "distance": f"{t.distance:.6f}", "export": key,
        }  # fmt: skip

    def slide_for(sid: str):
        if sid not in opened:
            a = facts[sid]["attrs"]
            path = Path(a["source_path"])
            slide = open_slide(path, mpp=tuple(a["mpp"]))
            if a.get("fingerprint") and file_fingerprint(path) != a["fingerprint"]:
                slide.close()
                raise HistoclusterError(
                    f"{path}: changed since its features were extracted — re-extract it (python -m engine.extract) or restore the file"
                )
            opened[sid] = slide
            levels[sid] = slide.best_level_for_mpp(mpp)
        return opened[sid]

    from PIL import Image
    from tqdm.auto import tqdm

    new_manifest = not (out / MANIFEST).exists()
    try:
        with open(out / MANIFEST, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            if new_manifest:
                writer.writeheader()
            for t in adopt:
                slide_for(t.slide_id)
                writer.writerow(row_of(t))
            f.flush()
            for t in tqdm(todo, desc="exporting", unit="tile", disable=not progress, leave=False):
                slide = slide_for(t.slide_id)
                pixels = slide.read_tile_at_mpp((t.l0_x, t.l0_y), mpp, tile_px)
                file = out / t.path
                file.parent.mkdir(parents=True, exist_ok=True)
                tmp = file.with_name(file.name + PARTIAL)
                img = Image.fromarray(pixels)
                if cfg.format == "jpg":
                    img.save(tmp, format="JPEG", quality=95)
                else:
                    img.save(tmp, format="PNG")
                os.replace(tmp, file)
                writer.writerow(row_of(t))
                f.flush()
                result.written += 1
    finally:
        for s in opened.values():
            s.close()
    for t in plan:
        result.per_class[t.cls] = result.per_class.get(t.cls, 0) + 1
    if not plan:
        result.warnings.append(
            f"{store.path}: clusters {cfg.clusters} of run {run!r} hold no tiles in the chosen slides — nothing exported"
        )

    if cfg.geojson:
        result.geojson = write_slide_geojson(out, record)
    entry.update(
        {"status": "complete", "finished": _now(), "files": len(plan), "geojson": bool(cfg.geojson)}
    )
    _write_json(record_path, record)
    return result


def write_slide_geojson(out: Path, record: dict[str, Any] | None = None) -> list[Path]:
    """``DIR/<slide_id>.geojson`` for every slide in the manifest: one MultiPolygon per class.

    Built from all of DIR's manifest rows, so classes exported earlier into DIR are included.
    """
    from engine.geojson import feature_collection, write_geojson

    record = record if record is not None else _load_json(out / EXPORT_JSON)
    colors = {name: v.get("color", [255, 0, 0]) for name, v in record.get("classes", {}).items()}
    by_slide: dict[str, dict[str, list[list[int]]]] = {}
    for row in read_manifest(out):
        x, y, w, h = (int(row[c]) for c in ("l0_x", "l0_y", "l0_w", "l0_h"))
        by_slide.setdefault(row["slide_id"], {}).setdefault(row["class"], []).append(
            [x, y, x + w, y + h]
        )
    written = []
    for sid, classes in sorted(by_slide.items()):
        fc = feature_collection(
            {
                name: (colors.get(name, [255, 0, 0]), np.array(boxes))
                for name, boxes in sorted(classes.items())
            }
        )
        path = out / f"{sid}.geojson"
        write_geojson(path, fc)
        written.append(path)
    return written


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated cluster numbers, got {text!r}"
        ) from None


def _name_list(text: str) -> list[str]:
    return text.split(",")


_EPILOG = f"""\
manifest.csv columns: {", ".join(MANIFEST_COLUMNS)}
  (path is relative to DIR; l0_* in level-0 pixels of the slide; distance to the cluster centroid
  in the clustering's feature space; export is the id of the export in export.json).

tile size: by default each file is the grid tile the features came from. --tile-px alone keeps
its physical size at another pixel size, --mpp alone keeps it at another resolution, both give
a region of tile_px x mpp micrometres centred on the grid tile.

several exports may share DIR (classes add up); an existing file is never replaced without
--overwrite; run the same command again to resume an interrupted export.

example:
  python -m engine.export features.zarr --run k8 --clusters 3,5 --names ink,crease --out patches --geojson
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.export",
        description="Export the tiles of chosen clusters as an ImageFolder patch set "
        "(DIR/<class>/<slide_id>_<l0_x>_<l0_y>.png) with manifest.csv, export.json and optional GeoJSON for QuPath.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store", type=Path, help="the features.zarr holding the cluster run")
    p.add_argument("--run", default=None, help="cluster run name (default: the latest run)")
    p.add_argument(
        "--clusters",
        type=_int_list,
        required=True,
        help="comma-separated cluster numbers, e.g. 3,5",
    )
    p.add_argument(
        "--names",
        type=_name_list,
        default=[],
        help="comma-separated class names, one per cluster; repeat a name to merge clusters (default: <run>_c<cluster>)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder; may already hold earlier exports (classes add up)",
    )
    p.add_argument(
        "--slides",
        nargs="+",
        default=[],
        metavar="ID",
        help="export only tiles of these slides (default: all slides of the run)",
    )
    p.add_argument(
        "--tile-px",
        type=int,
        default=None,
        help="pixels per tile side (default: the store's tile_px); alone it keeps the tile's physical size",
    )
    p.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="micrometres per pixel of the tiles (default: the store's target_mpp); alone it keeps the physical size",
    )
    p.add_argument(
        "--format", choices=["png", "jpg"], default="png", help="image format (default: png)"
    )
    p.add_argument(
        "--max-per-cluster",
        type=int,
        default=0,
        help="at most this many tiles per cluster, 0 = all (default: 0)",
    )
    p.add_argument(
        "--order",
        choices=["nearest", "random"],
        default="nearest",
        help="which tiles --max-per-cluster keeps: nearest the centroid or a random draw (default: nearest)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --order random (default: 0)")
    p.add_argument(
        "--geojson",
        action="store_true",
        help="also write DIR/<slide_id>.geojson, a MultiPolygon per class in level-0 pixels (QuPath annotations)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files that earlier exports wrote at the same paths",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 on success, 1 with a one-line ``error: ...`` on stderr."""
    from engine.store import FeatureStore

    cfg = ExportConfig(**vars(build_parser().parse_args(argv)))
    try:
        store = FeatureStore.open(cfg.store)
        result = run_export(store, cfg, progress=not cfg.quiet and sys.stderr.isatty())
    except HistoclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(
            f"error: {e.filename or cfg.out}: {e.strerror or e} — check the path and free space",
            file=sys.stderr,
        )
        return 1
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not cfg.quiet:
        print(
            f"{cfg.out}: wrote {result.written} tiles"
            + (f" (+{result.resumed} from an interrupted run)" if result.resumed else "")
        )
        for name, n in result.per_class.items():
            print(f"  {name}: {n}")
        for p in result.geojson:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
