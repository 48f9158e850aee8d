"""python -m engine.classify: a tile classifier trained from curated clusters, applied to whole stores.

    python -m engine.classify train STORE --run RUN --out MODEL [--classes ink=2,5 tissue=0,1,3]
    python -m engine.classify apply MODEL STORE --name NAME

Training labels: each named cluster's tiles (``--classes NAME=C1,C2 ...``, or the run's saved
curation) plus per-tile labels (a curation's overrides, or a review's answers); tiles of unnamed
clusters are not negatives. Validation is grouped so that neighbouring tiles never sit on both
sides of a split: ``GroupKFold`` over slides, and with a single slide over square blocks of
``--block-tiles`` tiles. Per-class precision, recall, F1 and a confusion-matrix PNG land next to
the model. ``apply`` predicts every tissue tile of every slide (slides added later too), chunk by
chunk, resumable, into ``predictions/<NAME>`` of the store.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine import cli
from engine.curation import Curation
from engine.errors import HistoclusterError
from engine.files import atomic_write_bytes, sha256_file
from engine.progress import Progress, no_progress
from engine.store import CHUNK, Block, FeatureStore
from engine.tile_classifier import TileClassifier, fit_classifier

__all__ = [
    "ApplyConfig",
    "ApplyResult",
    "TileLabels",
    "TrainConfig",
    "TrainResult",
    "apply",
    "labels_from_clusters",
    "main",
    "parse_class_spec",
    "train",
    "uncertain_tiles",
]

PALETTE = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
    "#fabebe", "#008080", "#e6beff", "#9a6324",
]  # fmt: skip


# ------------------------------------------------------------------------------ labels


@dataclass
class TileLabels:
    """Labelled tiles: ``slide`` (N,) slide ids, ``rows``, ``cols``, ``label`` (N,) int64 class indices."""

    classes: list[str]
    slide: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.label)

    def counts(self) -> dict[str, int]:
        return {c: int((self.label == i).sum()) for i, c in enumerate(self.classes)}


def parse_class_spec(specs: Sequence[str]) -> dict[str, list[int]]:
    """``["ink=2,5", "tissue=0,1,3"]`` -> {"ink": [2, 5], "tissue": [0, 1, 3]} (a cluster in one class only)."""
    out: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for spec in specs:
        name, sep, clusters = spec.partition("=")
        name = name.strip()
        try:
            ids = [int(c) for c in clusters.split(",") if c.strip()]
        except ValueError:
            ids = []
        if not sep or not name or not ids:
            raise HistoclusterError(
                f"--classes {spec!r}: write NAME=CLUSTER[,CLUSTER...], e.g. ink=2,5"
            )
        for c in ids:
            if c in owner and owner[c] != name:
                raise HistoclusterError(
                    f"--classes: cluster {c} is in both {owner[c]!r} and {name!r} — give each cluster one class"
                )
            owner[c] = name
        out.setdefault(name, []).extend(ids)
    return out


def labels_from_clusters(
    store: FeatureStore,
    run: str,
    classes: Mapping[str, Sequence[int]],
    tile_labels: Mapping[tuple[str, int, int], str | None] | None = None,
) -> TileLabels:
    """The training tiles of ``run``: every encoded tile of the named clusters, then per-tile labels.

    ``tile_labels`` maps (slide_id, row, col) to a class name (a correction) or None (excluded);
    a name not among ``classes`` becomes a new class.
    """
    names = list(classes)
    for name in (tile_labels or {}).values():
        if name is not None and name not in names:
            names.append(name)
    k = int(store.read_cluster_run(run, slide_ids=[]).attrs["k"])
    lut = np.full(k + 1, -1, np.int64)  # index -1 (outside tissue) maps to -1 too
    for i, name in enumerate(names[: len(classes)]):
        for c in classes[name]:
            if not 0 <= c < k:
                raise HistoclusterError(
                    f"--classes {name}={c}: run {run!r} has clusters 0..{k - 1} — pick clusters of that run"
                )
            lut[c] = i
    overrides: dict[str, list[tuple[int, int, int]]] = {}
    for (sid, r, c), name in (tile_labels or {}).items():
        overrides.setdefault(sid, []).append(
            (int(r), int(c), -1 if name is None else names.index(name))
        )
    parts = []
    for sid in store.read_cluster_run(run).attrs["slides"]:
        labels = lut[store.read_cluster_labels(run, sid).astype(np.int64)]
        sf = store.slide(sid)
        labels[~(sf.selected & sf.done)] = -1
        for r, c, lab in overrides.get(sid, []):
            if sf.selected[r, c] and sf.done[r, c]:
                labels[r, c] = lab
        r, c = np.nonzero(labels >= 0)
        parts.append((np.full(len(r), sid, dtype=object), r, c, labels[r, c]))
    if not parts or sum(len(p[1]) for p in parts) == 0:
        raise HistoclusterError(
            f"{store.path}: run {run!r} gives no labelled tiles — name some clusters"
        )
    slide, rows, cols, label = (np.concatenate(x) for x in zip(*parts, strict=True))
    return TileLabels(
        names, slide, rows.astype(np.int64), cols.astype(np.int64), label.astype(np.int64)
    )


def read_label_features(store: FeatureStore, labels: TileLabels) -> np.ndarray:
    """(N, dim) float32 features of the labelled tiles, read chunk by chunk."""
    out = np.empty((len(labels), store.dim), np.float32)
    for sid in np.unique(labels.slide):
        idx = np.flatnonzero(labels.slide == sid)
        out[idx] = store.slide(str(sid)).read_tiles(labels.rows[idx], labels.cols[idx])
    return out


# ------------------------------------------------------------------------------ train


@dataclass(frozen=True)
class TrainConfig:
    """``python -m engine.classify train``."""

    store: str = cli.option(positional=True, help="the feature store (features.zarr)")
    out: str = cli.option(help="the model to write: MODEL.npz + MODEL.json (+ MODEL.confusion.png)")
    run: str | None = cli.option(
        None, help="the cluster run whose clusters are named (default: the latest)"
    )
    classes: tuple[str, ...] = cli.option(
        (),
        nargs="*",
        metavar="NAME=C1,C2",
        help="classes as named clusters, e.g. ink=2,5 tissue=0,1,3 (default: the run's saved curation)",
    )
    model: Literal["logistic", "mlp"] = cli.option(
        "logistic",
        help="multinomial logistic regression (class-balanced) or a one-hidden-layer MLP head",
    )
    folds: int = cli.option(5, help="cross-validation folds (grouped by slide, or by tile blocks)")
    block_tiles: int = cli.option(
        8, help="side of the tile blocks that form CV groups within one slide"
    )
    max_per_class: int = cli.option(
        20000, help="at most this many training tiles per class (random)"
    )
    c: float = cli.option(1.0, help="inverse regularisation strength of the logistic regression")
    seed: int = cli.option(0, help="seed of the subsampling, the folds and the MLP")
    quiet: bool = cli.option(False, help="no progress bar or summary")
    tile_labels: Mapping[tuple[str, int, int], str | None] | None = cli.option(
        None, cli=False, help="per-tile labels (corrections, review answers)"
    )

    def config_path(self) -> Path:
        return (
            Path(self.out)
            .with_suffix("")
            .with_name(Path(self.out).with_suffix("").name + ".config.json")
        )


@dataclass
class TrainResult:
    model_path: Path
    classes: list[str]
    counts: dict[str, int]
    metrics: dict[str, Any]
    confusion_png: Path | None
    failures: list[str] = field(default_factory=list)


def _cv_groups(labels: TileLabels, block_tiles: int) -> np.ndarray:
    if len(np.unique(labels.slide)) >= 2:
        return np.unique(labels.slide, return_inverse=True)[1]
    return (labels.rows // block_tiles) * 1_000_003 + labels.cols // block_tiles


def _subsample(labels: TileLabels, max_per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = []
    for i in range(len(labels.classes)):
        idx = np.flatnonzero(labels.label == i)
        if len(idx) > max_per_class:
            idx = np.sort(rng.choice(idx, max_per_class, replace=False))
        keep.append(idx)
    return np.concatenate(keep)


def cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_classes: int,
    cfg: TrainConfig,
    progress: Progress,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold predictions (N,) and per-class precision / recall / F1 / support and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    from sklearn.model_selection import GroupKFold

    n_groups = len(np.unique(groups))
    folds = min(cfg.folds, n_groups)
    pred = np.full(len(y), -1, np.int64)
    if folds >= 2:
        splits = list(GroupKFold(n_splits=folds).split(x, y, groups))
        for i, (tr, te) in enumerate(splits):
            progress("cross-validation", i, len(splits))
            arrays = fit_classifier(x[tr], y[tr], n_classes, cfg.model, cfg.seed, cfg.c)
            model = TileClassifier(
                [""] * n_classes, [""] * n_classes, arrays, None, None, cfg.model
            )  # type: ignore[arg-type]
            pred[te] = model.predict_proba(x[te]).argmax(1)
        progress("cross-validation", len(splits), len(splits))
    scored = pred >= 0
    labels = list(range(n_classes))
    if not scored.any():  # one fold (or one group): nothing held out to score
        return pred, {
            "folds": 0,
            "precision": [None] * n_classes,
            "recall": [None] * n_classes,
            "f1": [None] * n_classes,
            "support": [0] * n_classes,
            "macro_f1": None,
            "accuracy": None,
            "confusion": np.zeros((n_classes, n_classes), int).tolist(),
        }
    p, r, f, s = precision_recall_fscore_support(
        y[scored], pred[scored], labels=labels, zero_division=0
    )
    cm = confusion_matrix(y[scored], pred[scored], labels=labels)
    metrics = {
        "folds": folds,
        "precision": p.round(4).tolist(),
        "recall": r.round(4).tolist(),
        "f1": f.round(4).tolist(),
        "support": s.tolist(),
        "macro_f1": round(float(f.mean()), 4),
        "accuracy": round(float((pred[scored] == y[scored]).mean()) if scored.any() else 0.0, 4),
        "confusion": cm.tolist(),
    }
    return pred, metrics


def _confusion_png(cm: np.ndarray, classes: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1.0 + 0.6 * len(classes)), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (curation)")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(
            j, i, str(v), ha="center", va="center", color="black" if v < cm.max() / 2 else "white"
        )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _training_labels(
    store: FeatureStore, run: str, cfg: TrainConfig
) -> tuple[dict[str, list[int]], dict[tuple[str, int, int], str | None]]:
    """(class -> clusters, per-tile labels): from ``--classes`` or the run's saved curation
    (its named clusters and its per-tile overrides), plus ``cfg.tile_labels`` on top."""
    extra = dict(cfg.tile_labels or {})
    if cfg.classes:
        return parse_class_spec(cfg.classes), extra
    if store.read_run_json(run, "curation") is None:
        raise HistoclusterError(
            f"{store.path}: run {run!r} has no saved curation — name clusters with --classes "
            "NAME=C1,C2 ..., or name them in the napari widget"
        )
    curation = Curation.load(store, run)
    classes = {name: curation.clusters_of(name) for name in curation.classes()}
    classes = {name: cs for name, cs in classes.items() if cs}
    return classes, {**curation.overrides(), **extra}


def train(cfg: TrainConfig, *, progress: Progress = no_progress) -> TrainResult:
    """Train a tile classifier from the named clusters of ``cfg.run`` and validate it."""
    for ok, msg in (
        (cfg.folds >= 1, f"--folds {cfg.folds}: must be 1 or more"),
        (cfg.block_tiles >= 1, f"--block-tiles {cfg.block_tiles}: must be 1 or more"),
        (cfg.max_per_class >= 1, f"--max-per-class {cfg.max_per_class}: must be 1 or more"),
        (cfg.c > 0, f"--c {cfg.c}: must be positive"),
    ):
        if not ok:
            raise HistoclusterError(msg)
    store = FeatureStore.open(cfg.store)
    run = cfg.run or store.latest_cluster_run()
    if run is None:
        raise HistoclusterError(
            f"{store.path}: no cluster run — run python -m engine.cluster first"
        )
    progress("labels", 0, 1)
    labels = labels_from_clusters(store, run, *_training_labels(store, run, cfg))
    keep = _subsample(labels, cfg.max_per_class, cfg.seed)
    labels = TileLabels(
        labels.classes, labels.slide[keep], labels.rows[keep], labels.cols[keep], labels.label[keep]
    )
    progress("labels", 1, 1)
    x = read_label_features(store, labels)
    n = len(labels.classes)
    _, metrics = cross_validate(
        x, labels.label, _cv_groups(labels, cfg.block_tiles), n, cfg, progress
    )
    metrics["grouped_by"] = (
        "slide"
        if len(np.unique(labels.slide)) >= 2
        else f"{cfg.block_tiles}x{cfg.block_tiles}-tile blocks"
    )
    progress("fit", 0, 1)
    arrays = fit_classifier(x, labels.label, n, cfg.model, cfg.seed, cfg.c)
    progress("fit", 1, 1)
    model = TileClassifier(
        classes=labels.classes,
        colours=[PALETTE[i % len(PALETTE)] for i in range(n)],
        arrays=arrays,
        encoder=store.encoder,
        tiling=store.tiling,
        kind=cfg.model,
        metrics={**metrics, "run": run, "counts": labels.counts()},
    )
    meta = model.save(cfg.out)
    png = meta.with_name(meta.stem + ".confusion.png")
    atomic_write_bytes(png, _confusion_png(np.asarray(metrics["confusion"]), labels.classes))
    return TrainResult(meta, labels.classes, labels.counts(), metrics, png)


def _train_report(cfg: TrainConfig, r: TrainResult) -> str:
    m = r.metrics
    rows = [f"trained {cfg.model} on {sum(r.counts.values())} tiles -> {r.model_path}"]
    rows.append(
        f"{m['folds']}-fold CV grouped by {m['grouped_by']}: accuracy {m['accuracy']}, macro F1 {m['macro_f1']}"
    )
    rows.append(f"  {'class':<16}{'tiles':>7}{'prec':>7}{'recall':>7}{'F1':>7}")
    if not m["folds"]:
        rows[-1] = "no cross-validation (one fold or one group): the figures need --folds 2 or more"
    for i, c in enumerate(r.classes):
        figs = "".join(
            f"{m[k][i]:>7.3f}" if m[k][i] is not None else f"{'-':>7}"
            for k in ("precision", "recall", "f1")
        )
        rows.append(f"  {c:<16}{r.counts[c]:>7}{figs}")
    rows.append(f"confusion matrix: {r.confusion_png}")
    return "\n".join(rows)


# ------------------------------------------------------------------------------ apply


@dataclass(frozen=True)
class ApplyConfig:
    """``python -m engine.classify apply``."""

    model: str = cli.option(
        positional=True, help="the MODEL written by engine.classify train (.json or .npz)"
    )
    store: str = cli.option(positional=True, help="the feature store to predict")
    name: str = cli.option(help="name of the prediction in the store (predictions/NAME)")
    overwrite: bool = cli.option(
        False, help="replace a prediction of that name made by another model"
    )
    quiet: bool = cli.option(False, help="no progress bar or summary")


@dataclass
class ApplyResult:
    name: str
    tiles: int
    slides: int
    per_class: dict[str, int]
    failures: list[str] = field(default_factory=list)


def apply(cfg: ApplyConfig, *, progress: Progress = no_progress) -> ApplyResult:
    """Predict every tissue tile of every slide in the store (chunks already predicted are kept)."""
    model = TileClassifier.load(cfg.model)
    store = FeatureStore.open(cfg.store, mode="r+")
    model.check_features(store.encoder, store.tiling, str(store.path))
    meta_path = (
        Path(cfg.model).with_suffix(".json")
        if Path(cfg.model).suffix == ".npz"
        else Path(cfg.model)
    )
    if meta_path.suffix != ".json":
        meta_path = meta_path.with_name(meta_path.name + ".json")
    maps = store.create_prediction(
        cfg.name,
        {
            "classes": model.classes,
            "colours": model.colours,
            "model": str(Path(meta_path).resolve()),
            "model_sha256": sha256_file(meta_path),
            "encoder": model.encoder.to_attrs(),
            "tiling": model.tiling.to_attrs(),
        },
        overwrite=cfg.overwrite,
    )
    slides = {sid: store.slide(sid) for sid in store.slide_ids()}
    selected = {sid: sf.selected for sid, sf in slides.items()}
    regions = [
        (sid, region)
        for sid, sf in slides.items()
        for region in _pending_regions(sf, maps.chunks_done(sid))
    ]
    total = sum(n for _, (_, n) in regions)
    per_class = np.zeros(len(model.classes), np.int64)
    tiles = chunks = 0
    progress("predict", 0, total)
    for sid, (
        region,
        n,
    ) in regions:  # a region: up to _REGION_CHUNKS pending chunks of one chunk row
        sf = slides[sid]
        feats, done = sf.read_block(region)
        sel = selected[sid][region.r0 : region.r1, region.c0 : region.c1] & done
        classes = np.full(region.shape, -1, np.int16)
        prob = np.zeros((*region.shape, len(model.classes)), np.float32)
        if sel.any():
            p = model.predict_proba(feats[sel].astype(np.float32))
            if not np.isfinite(p).all():
                raise HistoclusterError(
                    f"{sf.where}: non-finite features in rows {region.r0}-{region.r1} — re-extract the slide"
                )
            prob[sel] = p
            classes[sel] = p.argmax(1)
            per_class += np.bincount(p.argmax(1), minlength=len(model.classes))
            tiles += int(sel.sum())
        maps.write_block(sid, region, classes, prob)
        chunks += n
        progress("predict", chunks, total)  # Cancel lands after a whole region is written
    return ApplyResult(
        cfg.name, tiles, len(slides), dict(zip(model.classes, per_class.tolist(), strict=True))
    )


_REGION_CHUNKS = 8


def _pending_regions(sf: Any, chunks_done: np.ndarray) -> list[tuple[Block, int]]:
    """Runs of pending chunks along each chunk row (at most ``_REGION_CHUNKS``), as (region, chunks):
    one read and one write per run instead of per chunk."""
    out = []
    rows, cols = sf.shape
    for cr in range(chunks_done.shape[0]):
        cc = 0
        while cc < chunks_done.shape[1]:
            if chunks_done[cr, cc]:
                cc += 1
                continue
            start = cc
            while (
                cc < chunks_done.shape[1]
                and not chunks_done[cr, cc]
                and cc - start < _REGION_CHUNKS
            ):
                cc += 1
            region = Block(
                cr * CHUNK, min((cr + 1) * CHUNK, rows), start * CHUNK, min(cc * CHUNK, cols)
            )
            out.append((region, cc - start))
    return out


def _apply_report(cfg: ApplyConfig, r: ApplyResult) -> str:
    counts = ", ".join(f"{c} {n}" for c, n in r.per_class.items())
    return f"predicted {r.tiles} tiles of {r.slides} slide(s) into predictions/{r.name} of {cfg.store}: {counts}"


# ------------------------------------------------------------------------------ review


def uncertain_tiles(store: FeatureStore, name: str, n: int) -> list[tuple[str, int, int, float]]:
    """The ``n`` predicted tiles with the smallest margin between their two most likely classes.

    Returns (slide_id, row, col, margin) sorted by margin, most uncertain first.
    """
    maps = store.prediction(name)
    found: list[tuple[float, str, int, int]] = []
    for sid in maps.slide_ids():
        cls, prob = maps.read(sid)
        r, c = np.nonzero(cls >= 0)
        if len(r) == 0:
            continue
        p = np.sort(prob[r, c], axis=1)
        margin = p[:, -1] - (p[:, -2] if p.shape[1] > 1 else 0.0)
        take = np.argsort(margin, kind="stable")[:n]
        found += [(float(margin[i]), sid, int(r[i]), int(c[i])) for i in take]
    found.sort()
    return [(sid, r, c, m) for m, sid, r, c in found[:n]]


# ------------------------------------------------------------------------------ command line


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main_subcommands(
        {
            "train": (
                TrainConfig,
                train,
                _train_report,
                "train a tile classifier from named clusters",
            ),
            "apply": (ApplyConfig, apply, _apply_report, "predict every tissue tile of a store"),
        },
        argv,
        prog="python -m engine.classify",
        description=__doc__.split("\n\n")[0],
    )


if __name__ == "__main__":
    sys.exit(main())
