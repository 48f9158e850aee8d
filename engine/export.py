"""``python -m engine.export``: the tiles of chosen clusters, or of predicted classes, as a labelled patch set.

Writes, under ``--out DIR`` (see :mod:`engine.export_dir`)::

    DIR/<class>/<slide_id>_<l0_x>_<l0_y>.png   tiles read afresh from the slides (ImageFolder layout)
    DIR/manifest.csv                           one row per file (see MANIFEST_COLUMNS)
    DIR/export.json                            every export into DIR: configuration, classes, status
    DIR/<slide_id>.geojson                     with --geojson: a MultiPolygon per class (QuPath)

The tiles are a cluster run's (``--clusters``, or a curation), or a classifier's confident
predictions (``--predictions NAME --classes ink,crease --min-prob 0.9``: a tile whose predicted
class is one of ``--classes`` with at least that probability; see :mod:`engine.export_predictions`).

Several exports can go into one DIR: classes add up (the same class name gathers tiles from
several clusters or runs). A file that exists is never overwritten without ``--overwrite``.
Each file is written atomically and then listed in the manifest, so an export stopped anywhere
(Cancel, Ctrl-C, a kill) leaves only complete files, all listed, and export.json and the GeoJSON
say what was written; running the same export again resumes it.

Tile geometry: by default a tile is the grid tile the features came from (the store's
``tile_px`` at its ``target_mpp``). ``--tile-px`` alone keeps that physical size at another
pixel size; ``--mpp`` alone keeps it at another resolution; both together give a region of
``tile_px x mpp`` micrometres centred on the grid tile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from engine import cli
from engine.cli import option
from engine.curation import Curation
from engine.errors import HistoclusterError, one_line
from engine.export_choice import ClusterChoice, TileChoice
from engine.export_curation import CurationChoice, check_curation_fits, load_curation
from engine.export_dir import (
    MANIFEST_COLUMNS,
    ClassNameError,
    ManifestAppender,
    check_class_names,
    existing_classes,
    load_record,
    manifest_is_clean,
    manifest_is_current,
    read_manifest,
    remove_stale_temps,
    rewrite_manifest,
    write_record,
    write_slide_geojson,
)
from engine.export_plan import ExportPlan, PlannedTile, plan_export, tile_boxes, tile_geometry
from engine.export_predictions import PredictionChoice
from engine.files import atomic_write
from engine.mosaic import cluster_colors
from engine.progress import Cancelled, Progress, no_progress
from engine.slide import SlideCache
from engine.store import FeatureStore, file_fingerprint

__all__ = [
    "MANIFEST_COLUMNS",
    "ClassNameError",
    "ExportConfig",
    "ExportResult",
    "check_class_names",
    "main",
    "read_manifest",
    "run",
    "run_curation",
    "tile_boxes",
    "tile_geometry",
]

STAGE = "export"


def _comma_list(metavar: str, help: str) -> Any:
    """A flag taking one comma-separated token (``--clusters 3,5``), empty by default."""
    return option((), sep=",", metavar=metavar, show_default=False, help=help)


@dataclass(frozen=True)
class ExportConfig:
    """``python -m engine.export`` arguments (see ``--help``)."""

    store: Path = option(
        positional=True,
        parse=Path,
        help="the features.zarr holding the cluster run (or the prediction)",
    )
    out: Path = option(
        parse=Path, help="output folder; may already hold earlier exports (classes add up)"
    )
    run: str | None = option(None, help="cluster run name (default: the latest run)")
    clusters: tuple[int, ...] = _comma_list("3,5", "comma-separated cluster numbers, e.g. 3,5")
    names: tuple[str, ...] = _comma_list(
        "A,B",
        "comma-separated class names, one per cluster; repeat a name to merge clusters "
        "(default: <run>_c<cluster>)",
    )
    curation: Path | None = option(
        None,
        parse=Path,
        metavar="FILE",
        help="a curation JSON (a run's clusters/<run>/curation.json, or a copy): its class names, "
        "selected clusters and per-tile overrides decide the tiles (default without --clusters: "
        "the run's saved curation)",
    )
    predictions: str | None = option(
        None,
        metavar="NAME",
        help="export by prediction: the tiles a classifier (python -m engine.classify apply "
        "--name NAME) gives one of --classes with at least --min-prob; instead of "
        "--run/--clusters/--curation",
    )
    classes: tuple[str, ...] = _comma_list(
        "A,B",
        "with --predictions: comma-separated predicted classes to export, each under its own name "
        "(default: every class of the prediction)",
    )
    min_prob: float = option(
        0.5,
        help="with --predictions: the least probability of the predicted class, from 0 to 1",
    )
    slides: tuple[str, ...] = option(
        (),
        metavar="ID",
        show_default=False,
        help="export only tiles of these slides (default: all slides of the run or prediction)",
    )
    tile_px: int | None = option(
        None,
        help="pixels per tile side (default: the store's tile_px); alone it keeps the tile's physical size",
    )
    mpp: float | None = option(
        None,
        help="micrometres per pixel of the tiles (default: the store's target_mpp); alone it keeps the physical size",
    )
    format: Literal["png", "jpg"] = option("png", help="image format")
    max_per_cluster: int = option(
        0, help="at most this many tiles per cluster (with --predictions: per class), 0 = all"
    )
    order: Literal["nearest", "random"] = option(
        "nearest",
        help="which tiles --max-per-cluster keeps: nearest the centroid (with --predictions: "
        "the most probable) or a random draw",
    )
    seed: int = option(0, help="seed of --order random")
    geojson: bool = option(
        False,
        help="also write DIR/<slide_id>.geojson, a MultiPolygon per class in level-0 pixels (QuPath annotations)",
    )
    overwrite: bool = option(
        False, help="replace files that earlier exports wrote at the same paths"
    )
    quiet: bool = option(False, help="no progress bar and no summary")

    def to_json(self) -> dict[str, Any]:
        """The configuration as JSON values (paths resolved)."""
        d = asdict(self)
        d["store"] = str(Path(self.store).resolve())
        d["out"] = str(Path(self.out).resolve())
        d["curation"] = str(Path(self.curation).resolve()) if self.curation else None
        for k in ("clusters", "names", "slides", "classes"):
            d[k] = list(d[k])
        if self.predictions is None:  # a cluster export's record (and id) as before predictions
            for k in ("predictions", "classes", "min_prob"):
                d.pop(k)
        return d

    def signature(self, choice_key: Any = None) -> str:
        """Short id of what decides the files (not --out/--overwrite/--quiet/--geojson)."""
        d = self.to_json()
        for key in ("out", "overwrite", "quiet", "geojson"):
            d.pop(key)
        if choice_key is not None:
            d["choice"] = choice_key
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class ExportResult:
    """What one export wrote.

    ``written`` files now, ``resumed`` files found complete from an interrupted run of the same
    export; ``per_class`` {class: files of this export}, ``per_slide`` {slide_id: {class: files}};
    ``failures`` one line per slide that could not be read (its tiles were skipped).
    ``run`` is "" and ``prediction`` the prediction's name for an export by prediction.
    """

    out: Path
    run: str
    export_id: str
    prediction: str | None = None
    written: int = 0
    resumed: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    per_slide: dict[str, dict[str, int]] = field(default_factory=dict)
    geojson: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ checks


def _check_numbers(cfg: ExportConfig) -> None:
    if (
        cfg.max_per_cluster < 0
        or (cfg.tile_px is not None and cfg.tile_px < 1)
        or (cfg.mpp is not None and not cfg.mpp > 0)
    ):
        raise HistoclusterError(
            f"{cfg.out}: --max-per-cluster, --tile-px and --mpp must be positive — fix the value"
        )


def _cluster_choice(
    cfg: ExportConfig, store: FeatureStore, run: str, k: int, colors: Any
) -> ClusterChoice:
    """The ``--clusters`` / ``--names`` choice, checked."""
    clusters = [int(c) for c in cfg.clusters]
    if not clusters:
        raise HistoclusterError(f"{store.path}: no clusters chosen — pass --clusters 3,5")
    bad = [c for c in clusters if not 0 <= c < k]
    if bad:
        raise HistoclusterError(
            f"{store.path}: cluster run {run!r} has clusters 0..{k - 1}, not {bad} — fix --clusters"
        )
    if len(set(clusters)) != len(clusters):
        raise HistoclusterError(f"{store.path}: --clusters lists a cluster twice — list each once")
    names = list(cfg.names) if cfg.names else [f"{run}_c{c}" for c in clusters]
    if len(names) != len(clusters):
        raise HistoclusterError(
            f"{cfg.out}: {len(clusters)} clusters but {len(names)} --names — give one name per cluster"
        )
    palette = tuple(tuple(int(v) for v in colors[c]) for c in range(k))
    return ClusterChoice(tuple(clusters), tuple(names), palette)  # type: ignore[arg-type]


def _slides(
    cfg: ExportConfig,
    store: FeatureStore,
    what: str,
    run_slides: Sequence[str],
    extra: Sequence[str] = (),
) -> list[str]:
    """The slides to export: ``--slides`` or all of the run's (plus ``extra`` holding chosen tiles).

    ``what`` names the tiles' source in messages ("cluster run 'r'", "prediction 'p'").
    """
    allowed = sorted(set(run_slides) | set(extra))
    slides = sorted(set(cfg.slides)) if cfg.slides else allowed
    unknown = [s for s in slides if s not in allowed]
    if unknown:
        raise HistoclusterError(
            f"{store.path}: {what} has no slide {', '.join(map(repr, unknown))} "
            f"(slides: {', '.join(allowed)}) — check --slides"
        )
    return slides


# ------------------------------------------------------------------------------ run


def run(cfg: ExportConfig, *, progress: Progress = no_progress) -> ExportResult:
    """Export the chosen tiles of a cluster run into ``cfg.out``; see the module doc.

    Reports ``progress("plan", slides, n)`` while choosing tiles and ``progress("export", files,
    n)`` before each file. A ``Cancelled`` (or ``KeyboardInterrupt``) stops after the last whole
    file: the manifest lists it, export.json records the export as ``cancelled`` with its counts,
    the GeoJSON (with ``--geojson``) covers exactly the listed files; then it is re-raised.
    """
    store = FeatureStore.open(cfg.store)
    if cfg.predictions is not None:
        return export_choice(store, cfg, None, _prediction_choice(cfg, store), progress=progress)
    run_name, choice = _choose(cfg, store)
    return export_choice(store, cfg, run_name, choice, progress=progress)


def _prediction_choice(cfg: ExportConfig, store: FeatureStore) -> PredictionChoice:
    """The ``--predictions``/``--classes``/``--min-prob`` choice, checked."""
    given = [
        flag
        for flag, on in (
            ("--run", cfg.run is not None),
            ("--clusters", bool(cfg.clusters)),
            ("--names", bool(cfg.names)),
            ("--curation", cfg.curation is not None),
        )
        if on
    ]
    if given:
        raise HistoclusterError(
            f"{store.path}: give either --predictions or {'/'.join(given)} — a prediction "
            "names its own classes (choose them with --classes)"
        )
    assert cfg.predictions is not None
    return PredictionChoice(store, cfg.predictions, cfg.classes, cfg.min_prob)


def _choose(cfg: ExportConfig, store: FeatureStore) -> tuple[str, TileChoice]:
    """The run and the choice of tiles: ``--clusters``/``--names``, else a curation."""
    if cfg.classes or cfg.min_prob != 0.5:
        flag = "--classes" if cfg.classes else "--min-prob"
        raise HistoclusterError(
            f"{store.path}: {flag} chooses predicted classes and needs --predictions NAME — "
            "name cluster classes with --clusters/--names instead"
        )
    if cfg.clusters and cfg.curation is not None:
        raise HistoclusterError(
            f"{cfg.curation}: give either --clusters or --curation — the curation names its own clusters"
        )
    if cfg.names and not cfg.clusters:
        raise HistoclusterError(
            f"{store.path}: --names needs --clusters (one name per cluster) — pass --clusters 3,5"
        )
    loaded = None if cfg.clusters else load_curation(store, cfg.run, cfg.curation)
    run_name = loaded[0] if loaded else (cfg.run or store.latest_cluster_run())
    if run_name is None:
        raise HistoclusterError(
            f"{store.path}: holds no cluster runs — run python -m engine.cluster first"
        )
    k, colors = _run_colors(store, run_name)
    if cfg.clusters:
        return run_name, _cluster_choice(cfg, store, run_name, k, colors)
    if loaded is None:
        raise HistoclusterError(
            f"{store.path}: no clusters chosen and run {run_name!r} has no saved curation — pass "
            "--clusters 3,5, or --curation FILE, or name and select clusters in napari"
        )
    _, curation, source = loaded
    return run_name, _curation_choice(store, curation, colors, source)


def _run_colors(store: FeatureStore, run_name: str) -> tuple[int, list[list[int]]]:
    """(k, (k, 3) colours) of a run, after checking it was fitted on the store's features."""
    store.check_cluster_run(run_name)  # the run's recorded EncoderId against the store's
    attrs = store.read_cluster_run(run_name, slide_ids=[]).attrs
    k = int(attrs["k"])
    return k, attrs.get("colors") or cluster_colors(k).tolist()


def _curation_choice(
    store: FeatureStore, curation: Curation, colors: Sequence[Sequence[int]], source: str
) -> CurationChoice:
    choice = CurationChoice(curation, store, colors, source=source)
    if not choice.classes:
        raise HistoclusterError(
            f"{source}: the curation of run {curation.run!r} selects no named cluster and moves "
            "no tile to a class — name and select clusters (napari), or pass --clusters 3,5"
        )
    return choice


def run_curation(
    cfg: ExportConfig,
    curation: Curation,
    *,
    progress: Progress = no_progress,
) -> ExportResult:
    """Export ``curation`` (e.g. the widget's, unsaved edits included) of its run into ``cfg.out``.

    ``cfg.clusters``, ``cfg.names``, ``cfg.curation`` and ``cfg.run`` are ignored: the curation
    decides the run and the tiles.
    """
    store = FeatureStore.open(cfg.store)
    _, colors = _run_colors(store, curation.run)
    check_curation_fits(store, curation, f"the curation of run {curation.run!r}")
    choice = _curation_choice(store, curation, colors, "given")
    cfg = dataclasses.replace(cfg, run=curation.run, clusters=(), names=(), curation=None)
    return export_choice(store, cfg, curation.run, choice, progress=progress)


def export_choice(
    store: FeatureStore,
    cfg: ExportConfig,
    run_name: str | None,
    choice: TileChoice,
    *,
    progress: Progress = no_progress,
) -> ExportResult:
    """Write the tiles ``choice`` gives a class (see :class:`~engine.export_choice.TileChoice`).

    ``run_name`` None: an export without a cluster run (by prediction); the slides are then
    ``choice.extra_slides``, and the rows' ``run``/``cluster``/``distance`` are empty.
    """
    _check_numbers(cfg)
    out = Path(cfg.out)
    if run_name is None:
        what = f"prediction {cfg.predictions!r}" if cfg.predictions else "the choice"
        slides = _slides(cfg, store, what, [], choice.extra_slides)
    else:
        attrs = store.read_cluster_run(run_name, slide_ids=[]).attrs
        slides = _slides(
            cfg, store, f"cluster run {run_name!r}", attrs.get("slides", []), choice.extra_slides
        )
    if out.exists() and not out.is_dir():
        raise HistoclusterError(f"{out}: exists and is not a directory — choose another --out")
    record = load_record(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "export.json").exists():
        raise HistoclusterError(
            f"{out}: is a non-empty folder that no engine.export wrote — choose another --out"
        )
    classes = list(choice.classes)
    try:
        check_class_names([c.name for c in classes], existing_classes(out, record))
    except ClassNameError as e:
        raise ClassNameError(f"{out}: {e}") from None

    tile_px, mpp = tile_geometry(store.tiling, cfg.tile_px, cfg.mpp)
    plan = plan_export(
        store,
        run_name,
        choice,
        slides,
        tile_px=tile_px,
        mpp=mpp,
        ext="jpg" if cfg.format == "jpg" else "png",
        max_per_cluster=cfg.max_per_cluster,
        order=cfg.order,
        seed=cfg.seed,
        progress=progress,
    )
    key = cfg.signature(choice.key())
    started_before = any(e.get("id") == key for e in record["exports"])
    manifest = read_manifest(out)
    listed = {row["path"]: row for row in manifest}

    todo: list[PlannedTile] = []
    adopt: list[PlannedTile] = []
    replace: set[str] = set()
    conflicts: list[str] = []
    for t in plan.tiles:
        file = out / t.path
        row = listed.get(t.path)
        exists = file.exists()
        if exists and row is not None and row.get("export") == key:
            continue  # done by this export before
        if exists and row is None and started_before:
            adopt.append(t)  # written (atomically) just before an interruption, row missing
            continue
        if exists or row is not None:
            if exists and not cfg.overwrite:
                conflicts.append(t.path)
                continue
            replace.add(t.path)
        todo.append(t)
    if conflicts:
        raise HistoclusterError(
            f"{out / conflicts[0]}: exists from an earlier export ({len(conflicts)} such file(s)) — "
            "pass --overwrite to replace them, or choose another --out"
        )

    # Record the export before writing anything, so an interruption can be resumed.
    src_store = str(Path(cfg.store).resolve())
    for klass in classes:
        entry = record["classes"].setdefault(
            klass.name, {"color": [int(v) for v in klass.color], "sources": []}
        )
        sources: list[dict[str, Any]] = [
            {"store": src_store, "run": run_name, "cluster": int(c)} for c in klass.clusters
        ]
        if klass.prediction is not None:
            sources.append({"store": src_store, "prediction": klass.prediction})
        for src in sources:
            if src not in entry["sources"]:
                entry["sources"].append(src)
    entry = next((e for e in record["exports"] if e.get("id") == key), None)
    if entry is None:
        entry = {"id": key}
        record["exports"].append(entry)
    entry.update(
        {
            "config": {**cfg.to_json(), "run": run_name, "names": [c.name for c in classes]},
            "choice": choice.describe(),
            "tile_px": tile_px,
            "mpp": mpp,
            "status": "running",
            "started": _now(),
        }
    )
    out.mkdir(parents=True, exist_ok=True)
    write_record(out, record)
    if replace:
        manifest = [r for r in manifest if r["path"] not in replace]
        rewrite_manifest(out, manifest)
    elif not manifest_is_clean(out) or not manifest_is_current(out):
        rewrite_manifest(out, manifest)  # drop a row cut short by a kill; an older header
    remove_stale_temps({out / c.name for c in classes})

    result = ExportResult(
        out=out,
        run=run_name or "",
        export_id=key,
        prediction=cfg.predictions if run_name is None else None,
        resumed=len(adopt),
    )
    result.warnings.extend(choice.warnings)
    try:
        _write_tiles(store, cfg, plan, run_name, key, todo, adopt, result, progress)
    except (Cancelled, KeyboardInterrupt):
        _finish(out, cfg, record, entry, plan, key, result, "cancelled")
        raise
    except BaseException:
        _finish(out, cfg, record, entry, plan, key, result, "failed")
        raise
    _finish(
        out, cfg, record, entry, plan, key, result, "incomplete" if result.failures else "complete"
    )
    if not plan.tiles:
        what = f"run {run_name!r}" if run_name else f"prediction {cfg.predictions!r}"
        result.warnings.append(
            f"{store.path}: the chosen tiles of {what} are none in the chosen slides — nothing exported"
        )
    return result


def _write_tiles(
    store: FeatureStore,
    cfg: ExportConfig,
    plan: ExportPlan,
    run_name: str | None,
    key: str,
    todo: list[PlannedTile],
    adopt: list[PlannedTile],
    result: ExportResult,
    progress: Progress,
) -> None:
    """Write ``todo`` (each file atomically, then its manifest row); list ``adopt`` first."""
    from PIL import Image

    out = Path(cfg.out)
    tile_px, mpp = plan.tile_px, plan.mpp
    levels: dict[str, int] = {}
    failed: dict[str, str] = {}
    total = len(plan.tiles)
    done = total - len(todo)

    def row_of(t: PlannedTile) -> dict[str, Any]:
        return {
            "path": t.path, "class": t.cls, "cluster": "" if run_name is None else t.cluster,
            "run": run_name or "",
            "slide_path": plan.slides[t.slide_id]["source_path"], "slide_id": t.slide_id,
            "row": t.row, "col": t.col, "l0_x": t.l0_x, "l0_y": t.l0_y, "l0_w": t.l0_w,
            "l0_h": t.l0_h, "level": levels.get(t.slide_id, ""), "mpp": f"{mpp:.6g}",
            "tile_px": tile_px, "export": key,
            "distance": "" if math.isnan(t.distance) else f"{t.distance:.6f}",
            "prob": "" if math.isnan(t.prob) else f"{t.prob:.6f}",
        }  # fmt: skip

    with SlideCache(capacity=4) as cache, ManifestAppender(out) as manifest:

        def slide_for(sid: str) -> Any:
            a = plan.slides[sid]
            path = Path(a["source_path"])
            slide = cache.get(path, tuple(a["mpp"]))
            if sid not in levels:
                if a.get("fingerprint") and file_fingerprint(path) != a["fingerprint"]:
                    raise HistoclusterError(
                        f"{path}: changed since its features were extracted — re-extract it "
                        "(python -m engine.extract) or restore the file"
                    )
                levels[sid] = slide.best_level_for_mpp(mpp)
            return slide

        for t in adopt:  # complete files whose rows a kill kept from the manifest
            try:
                slide_for(t.slide_id)  # for the level column
            except (HistoclusterError, OSError):
                pass
            manifest.write(row_of(t))
        for t in todo:
            progress(STAGE, done, total)
            if t.slide_id in failed:
                continue
            try:
                slide = slide_for(t.slide_id)
                pixels = slide.read_tile_at_mpp((t.l0_x, t.l0_y), mpp, tile_px)
            except (HistoclusterError, OSError) as e:
                failed[t.slide_id] = one_line(e)
                cache.forget(plan.slides[t.slide_id]["source_path"])
                continue
            file = out / t.path
            file.parent.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(pixels)
            if cfg.format == "jpg":
                atomic_write(file, lambda f, img=img: img.save(f, format="JPEG", quality=95))
            else:
                atomic_write(file, lambda f, img=img: img.save(f, format="PNG"))
            manifest.write(row_of(t))
            result.written += 1
            done += 1
        progress(STAGE, done, total)
    for sid, why in failed.items():
        skipped = sum(1 for t in todo if t.slide_id == sid)
        result.failures.append(f"{why} (slide {sid}: up to {skipped} tiles not exported)")


def _finish(
    out: Path,
    cfg: ExportConfig,
    record: dict[str, Any],
    entry: dict[str, Any],
    plan: ExportPlan,
    key: str,
    result: ExportResult,
    status: str,
) -> None:
    """Make export.json and the GeoJSON say exactly what the manifest lists (also after a cancel)."""
    rows = read_manifest(out)
    planned = {t.path for t in plan.tiles}
    mine = [r for r in rows if r.get("export") == key and r["path"] in planned]
    result.per_class, result.per_slide = {}, {}
    for r in mine:
        result.per_class[r["class"]] = result.per_class.get(r["class"], 0) + 1
        per = result.per_slide.setdefault(r["slide_id"], {})
        per[r["class"]] = per.get(r["class"], 0) + 1
    in_dir = {r["class"] for r in rows}
    for name in [n for n in record["classes"] if n not in in_dir]:
        del record["classes"][name]  # a class this (cancelled) export never reached
    if cfg.geojson:
        colors = {n: v.get("color", [255, 0, 0]) for n, v in record["classes"].items()}
        result.geojson = write_slide_geojson(out, colors, rows)
    entry.update(
        {
            "status": status,
            "finished": _now(),
            "files": len(mine),
            "planned": len(plan.tiles),
            "per_class": result.per_class,
            "per_slide": result.per_slide,
            "geojson": bool(cfg.geojson),
        }
    )
    if result.failures:
        entry["failures"] = list(result.failures)
    write_record(out, record)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------ command line


def report(cfg: ExportConfig, result: ExportResult) -> str:
    """The summary: files written, per class, per slide, GeoJSON files (cli.main prints warnings)."""
    source = f" of prediction {result.prediction!r}" if result.prediction else ""
    lines = [
        f"{cfg.out}: wrote {result.written} tiles{source}"
        + (f" (+{result.resumed} from an interrupted run)" if result.resumed else "")
    ]
    for name, n in result.per_class.items():
        lines.append(f"  {name}: {n}")
    if len(result.per_slide) > 1:
        for sid, counts in sorted(result.per_slide.items()):
            lines.append(f"  {sid}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    lines += [f"wrote {p}" for p in result.geojson]
    return "\n".join(lines)


_DESCRIPTION = (
    "Export the tiles of chosen clusters, or of a classifier's confident predicted classes, as an "
    "ImageFolder patch set (DIR/<class>/<slide_id>_<l0_x>_<l0_y>.png) with manifest.csv, "
    "export.json and optional GeoJSON for QuPath."
)

_EPILOG = f"""\
manifest.csv columns: {", ".join(MANIFEST_COLUMNS)}
  (path is relative to DIR; l0_* in level-0 pixels of the slide; distance to the cluster centroid
  in the clustering's feature space; prob, with --predictions, the probability of the predicted
  class (run, cluster and distance are then empty); export is the id of the export in export.json).

export by prediction: --predictions NAME (made by python -m engine.classify apply --name NAME)
writes a tile under class C when its predicted class is C, C is one of --classes and its
probability is at least --min-prob; most probable first under --max-per-cluster.

tile size: by default each file is the grid tile the features came from. --tile-px alone keeps
its physical size at another pixel size, --mpp alone keeps it at another resolution, both give
a region of tile_px x mpp micrometres centred on the grid tile.

several exports may share DIR (classes add up); an existing file is never replaced without
--overwrite; run the same command again to resume an interrupted export.

exit status: 0 done; 1 done, but some slides could not be read (named); 2 bad input; 130 interrupted.

example:
  python -m engine.export features.zarr --run k8 --clusters 3,5 --names ink,crease --out patches --geojson
  python -m engine.export features.zarr --predictions p --classes ink,crease --min-prob 0.9 --out sure --geojson
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point; the exit status of :func:`engine.cli.main`."""
    return cli.main(ExportConfig, run, argv, description=_DESCRIPTION, epilog=_EPILOG,
                    report=report, report_stream="stdout")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
