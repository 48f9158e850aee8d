"""Run the grid encoders x protocols x fractions x seeds, resumably, and write the reports.

Output folder::

    OUT/config.json           the configuration and, under "resolved", its signature (which
                              must match to resume), the dataset's size and classes, the device
    OUT/results.csv           one row per finished cell (rewritten atomically as cells finish)
    OUT/results.md            mean ± std over seeds per (protocol, fraction, encoder)
    OUT/metric_vs_fraction.png
    OUT/cells/*.json          per-cell details: split sizes, selected epoch, per-epoch history
    OUT/skipped_files.txt     images that failed to decode (when any)
    OUT/features/*.npy        cached frozen features (linear and kNN protocols)

Progress stages: ``check`` (files decoded), ``features`` (images encoded), ``train`` (training
steps, or kNN queries, of the current cell), ``cells`` (cells finished of the grid). A
``Cancelled`` raised by the progress callback stops the run: every finished cell is kept in
``results.csv`` (whole rows only) and in the reports, and the same call resumes.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.cli import write_config
from engine.distributed import resolve_device
from engine.errors import HistoclusterError
from engine.evaluate.config import PROTOCOLS, EvalConfig
from engine.evaluate.datasets import DatasetError, Samples, drop_undecodable, load_samples
from engine.evaluate.features import FeatureSettings, LabelledFeatures, cached_features
from engine.evaluate.finetune import finetune, paper_weight_decay
from engine.evaluate.knn import knn_evaluate
from engine.evaluate.linear import linear_probe
from engine.evaluate.report import encoder_labels, plot_metric_vs_fraction, write_markdown
from engine.evaluate.results import ResultsFile, cell_key
from engine.evaluate.segmentation import segment
from engine.evaluate.splits import Split, make_split, train_fraction
from engine.evaluate.training import Selected, TrainSettings
from engine.files import atomic_write_text
from engine.models import Encoder
from engine.models import load_encoder as load_model
from engine.progress import Cancelled, Progress, no_progress

__all__ = ["ConfigError", "EvalResult", "check_config", "run", "write_reports"]

EncoderLoader = Callable[[str], Encoder]


class ConfigError(HistoclusterError):
    """Settings that cannot work together; the message names the flag and the fix."""


@dataclass(frozen=True)
class EvalResult:
    """What a run left in ``out``.

    ``cells``: cells in the grid; ``ran``: cells computed by this run; ``resumed``: cells found
    finished in ``results.csv``; ``skipped_files``: images that could not be decoded (listed in
    ``skipped_files.txt``; the evaluation ran on the rest).
    """

    results: Path
    markdown: Path
    plot: Path
    cells: int
    ran: int
    resumed: int
    skipped_files: int
    warnings: tuple[str, ...] = ()


def check_config(cfg: EvalConfig) -> None:
    """Reject impossible combinations before any work starts."""
    if not cfg.encoders:
        raise ConfigError("--encoders: no encoder given — pass one or more specs, comma-separated")
    bad = [p for p in cfg.protocols if p not in PROTOCOLS]
    if bad:
        raise ConfigError(f"--protocol: unknown {bad[0]!r} — use linear, finetune or knn")
    if not cfg.protocols:
        raise ConfigError("--protocol: no protocol given — pass e.g. linear,knn")
    if cfg.task == "segmentation" and set(cfg.protocols) != {"finetune"}:
        raise ConfigError(
            "--protocol: segmentation is evaluated by fine-tuning only (the paper omits last-layer "
            "training for segmentation) — pass --protocol finetune"
        )
    if cfg.epochs < 1:
        raise ConfigError("--epochs: must be at least 1")
    if cfg.k < 1:
        raise ConfigError("--k: must be at least 1")
    if cfg.batch_size < 1:
        raise ConfigError("--batch-size: must be at least 1")
    if cfg.workers < 0:
        raise ConfigError("--workers: must be 0 or more")
    if cfg.input_px is not None and cfg.input_px < 1:
        raise ConfigError("--input-px: must be at least 1")
    if cfg.seg_crops < 1:
        raise ConfigError("--seg-crops: must be at least 1")
    if not cfg.seeds:
        raise ConfigError("--seeds: no seed given — pass e.g. 0,1,2")
    if not cfg.fractions:
        raise ConfigError("--fractions: no fraction given — pass e.g. 10,100")
    for f in cfg.fractions:
        if not 0 < f <= 100:
            raise ConfigError(f"--fractions: {f:g} is not a percentage in (0, 100] — e.g. 1,10,100")
    if not cfg.seg_scale > 0:
        raise ConfigError("--seg-scale: must be positive")


def _device(cfg: EvalConfig) -> torch.device:
    try:
        device = resolve_device(cfg.device)
    except RuntimeError:
        raise ConfigError(
            f"--device {cfg.device}: not a device — use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            raise ConfigError(
                f"--device {cfg.device}: this machine has {count} CUDA device(s) — "
                "use --device auto or cpu"
            )
    return device


def _check_signature(cfg: EvalConfig) -> None:
    path = cfg.out / "config.json"
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    old = data.get("resolved", {}).get("signature") or data.get("signature") or {}
    new = cfg.signature()
    for k in sorted(set(old) | set(new)):
        # a setting recorded before it existed ran with its default
        before = old[k] if k in old else EvalConfig.signature_default(k)
        if before != new.get(k):
            raise ConfigError(
                f"{path}: results here were made with {k}={before!r}, now {k}={new.get(k)!r} — "
                "use another --out, or the same settings to resume"
            )


def _cell_file(out: Path, key: tuple[str, ...]) -> Path:
    """``cells/<encoder>_<protocol>_<fraction>_<seed>.json``; a checkpoint path's name gets a hash
    of the whole path, so ``a/encoder.pt`` and ``b/encoder.pt`` do not overwrite each other."""
    spec = key[0]
    if "/" in spec or "\\" in spec:
        spec = f"{Path(spec).name}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"
    name = "_".join(re.sub(r"[^A-Za-z0-9.-]+", "-", k) for k in (spec, *key[1:]))
    return out / "cells" / f"{name}.json"


def write_reports(cfg: EvalConfig) -> tuple[Path, Path]:
    """(Re)write ``results.md`` and ``metric_vs_fraction.png`` from ``results.csv``."""
    rows = ResultsFile(cfg.out / "results.csv", cfg.task).rows()
    title = f"{cfg.task} on {Path(cfg.dataset).name}"
    md = write_markdown(rows, cfg.task, cfg.out / "results.md", title)
    png = plot_metric_vs_fraction(rows, cfg.task, cfg.out / "metric_vs_fraction.png", title)
    return md, png


def _splits(cfg: EvalConfig, samples: Samples) -> dict[tuple[float, int], tuple[Split, np.ndarray]]:
    """Every (fraction, seed) -> (split, training subset), checked before any training."""
    out: dict[tuple[float, int], tuple[Split, np.ndarray]] = {}
    for seed in cfg.seeds:
        split = make_split(samples, cfg.split_seed if cfg.split_seed is not None else seed)
        for f in cfg.fractions:
            out[(f, seed)] = (split, train_fraction(samples, split.train, f, seed))
    return out


def _log(cfg: EvalConfig, message: str) -> None:
    if not cfg.quiet:
        tqdm.write(message, file=sys.stderr)


def _load_all(specs: list[str], load: EncoderLoader) -> dict[str, Encoder]:
    """Every encoder loaded once up front, so a bad spec fails before hours of work."""
    return {spec: load(spec) for spec in dict.fromkeys(specs)}


def run(
    cfg: EvalConfig,
    *,
    progress: Progress = no_progress,
    load_encoder: EncoderLoader | None = None,
) -> EvalResult:
    """Run every unfinished cell of ``cfg``'s grid and (re)write the reports.

    ``load_encoder(spec) -> Encoder`` defaults to :func:`engine.models.load_encoder`. Raises
    :class:`~engine.errors.HistoclusterError` subclasses for bad input, and what ``progress``
    raises (``Cancelled``) after keeping every finished cell (see the module docstring).
    """
    check_config(cfg)
    _check_signature(cfg)
    device = _device(cfg)
    load = load_encoder or _default_loader(cfg.trust_checkpoint)

    warnings: list[str] = []
    samples = load_samples(cfg.dataset, cfg.task)
    samples, skipped = drop_undecodable(samples, workers=max(1, cfg.workers), progress=progress)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if skipped:
        listing = "\n".join(f"{p}\t{reason}" for p, reason in sorted(skipped.items()))
        atomic_write_text(cfg.out / "skipped_files.txt", listing + "\n")
        warnings.append(
            f"{len(skipped)} file(s) could not be decoded and were skipped — "
            f"listed in {cfg.out / 'skipped_files.txt'}"
        )
    plan = _splits(cfg, samples)
    write_config(
        cfg.out / "config.json",
        cfg,
        signature=cfg.signature(),
        dataset={
            "path": cfg.to_json()["dataset"],
            "samples": len(samples),
            "classes": samples.classes,
            "own_split": samples.split is not None,
            "skipped_files": len(skipped),
        },
        device=str(device),
    )

    results = ResultsFile(cfg.out / "results.csv", cfg.task)
    finished = results.finished()
    cells = [
        (enc, proto, f, seed)
        for enc in cfg.encoders
        for proto in cfg.protocols
        for f in cfg.fractions
        for seed in cfg.seeds
    ]
    todo = [c for c in cells if cell_key(*c) not in finished]
    resumed = len(cells) - len(todo)
    if resumed:
        _log(cfg, f"resuming: {resumed} of {len(cells)} cells already finished")
    encoders = _load_all([c[0] for c in todo], load)

    ran = 0
    progress("cells", resumed, len(cells))
    try:
        for spec in list(encoders):
            encoder = encoders.pop(spec)
            ran += _run_encoder(cfg, spec, encoder, samples, todo, plan, device, results,
                                progress, resumed + ran, len(cells))  # fmt: skip
            del encoder
    except (Cancelled, KeyboardInterrupt):
        if results.path.is_file():
            _write_reports_quietly(cfg)
        raise
    md, png = write_reports(cfg)
    return EvalResult(
        results.path, md, png, len(cells), ran, resumed, len(skipped), tuple(warnings)
    )


def _write_reports_quietly(cfg: EvalConfig) -> None:
    """The reports of the cells finished before an interruption (best effort)."""
    try:
        write_reports(cfg)
    except Exception:  # noqa: BLE001 - the interruption is what the user must hear about
        pass


def _default_loader(trust: bool) -> EncoderLoader:
    def load(spec: str) -> Encoder:
        return load_model(spec, trust_checkpoint=trust)

    return load


def _run_encoder(
    cfg: EvalConfig,
    spec: str,
    encoder: Encoder,
    samples: Samples,
    todo: list[tuple[str, str, float, int]],
    plan: dict[tuple[float, int], tuple[Split, np.ndarray]],
    device: torch.device,
    results: ResultsFile,
    progress: Progress,
    done: int,
    total: int,
) -> int:
    """The unfinished cells of one encoder; returns how many were finished."""
    px = cfg.input_px or encoder.input_px
    features: np.ndarray | None = None
    label = encoder_labels(cfg.encoders)[spec]
    ran = 0
    for _, proto, fraction, seed in (c for c in todo if c[0] == spec):
        split, train_idx = plan[(fraction, seed)]
        if proto in ("linear", "knn") and features is None:
            how = FeatureSettings(
                px, cfg.fit, device, batch_size=max(cfg.batch_size, 64), workers=cfg.workers,
                precision=cfg.precision,
            )  # fmt: skip
            features, cache_path, hit = cached_features(
                cfg.cache_dir(), encoder, samples, how, progress,
                label=f"{Path(spec).name}-{Path(cfg.dataset).name}",
            )  # fmt: skip
            _log(cfg, f"features of {spec}: {'cached' if hit else 'computed'} ({cache_path})")
        start = time.perf_counter()
        selected = _run_cell(cfg, encoder, samples, proto, split, train_idx, seed, px,
                             features, device, progress)  # fmt: skip
        seconds = time.perf_counter() - start
        key = cell_key(spec, proto, fraction, seed)
        row = {
            "encoder": key[0], "protocol": key[1], "fraction": key[2], "seed": key[3],
            "n_train": len(train_idx), "n_val": len(split.val), "n_test": len(split.test),
            "best_epoch": selected.best_epoch, "seconds": round(seconds, 2),
            **{f"val_{k}": v for k, v in selected.val.items()},
            **{f"test_{k}": v for k, v in selected.test.items()},
        }  # fmt: skip
        cell_file = _cell_file(cfg.out, key)
        cell_file.parent.mkdir(parents=True, exist_ok=True)
        detail = {**row, "selected": asdict(selected)}
        atomic_write_text(cell_file, json.dumps(detail, indent=1))
        results.append(row)
        ran += 1
        _log(cfg, f"cell {done + ran}/{total}: {label} {proto} {fraction:g}% seed {seed} done")
        progress("cells", done + ran, total)
    return ran


def _run_cell(
    cfg: EvalConfig,
    encoder: Encoder,
    samples: Samples,
    protocol: str,
    split: Split,
    train_idx: np.ndarray,
    seed: int,
    px: int,
    features: np.ndarray | None,
    device: torch.device,
    progress: Progress,
) -> Selected:
    split = replace(split, train=train_idx)
    training = TrainSettings(
        epochs=cfg.epochs, lr=cfg.lr_for("finetune"), weight_decay=cfg.weight_decay,
        batch_size=cfg.batch_size, seed=seed, device=device, workers=cfg.workers,
    )  # fmt: skip
    if cfg.task == "segmentation":
        return segment(
            encoder, samples, split, px, cfg.seg_scale, cfg.seg_crops, training, progress
        )
    if protocol == "finetune":
        return finetune(encoder, samples, split, px, cfg.fit, training, progress)
    assert features is not None and samples.targets is not None
    data = LabelledFeatures(features, samples.targets, cfg.task, samples.num_classes)
    if protocol == "knn":
        return knn_evaluate(data, split, cfg.k, device, progress)
    if protocol == "linear":
        wd = cfg.weight_decay if cfg.weight_decay is not None else paper_weight_decay(encoder.arch)
        return linear_probe(
            data, split, replace(training, lr=cfg.lr_for("linear"), weight_decay=wd), progress
        )
    raise DatasetError(f"unknown protocol {protocol!r}")  # unreachable after check_config
