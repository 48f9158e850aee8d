"""Run the grid encoders x protocols x fractions x seeds, resumably, and write the reports.

Output folder::

    OUT/config.json           the resolved configuration (its signature must match to resume)
    OUT/results.csv           one row per finished cell (appended as cells finish)
    OUT/results.md            mean ± std over seeds per (protocol, fraction, encoder)
    OUT/metric_vs_fraction.png
    OUT/cells/*.json          per-cell details: split sizes, selected epoch, per-epoch history
    OUT/skipped_files.txt     images that failed to decode (when any)
    OUT/features/*.npy        cached frozen features (linear and kNN protocols)
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.distributed import resolve_device
from engine.errors import HistoclusterError
from engine.evaluate.config import EvalConfig
from engine.evaluate.datasets import DatasetError, Samples, drop_undecodable, load_samples
from engine.evaluate.features import cached_features
from engine.evaluate.finetune import finetune, paper_weight_decay
from engine.evaluate.knn import knn_evaluate
from engine.evaluate.linear import linear_probe
from engine.evaluate.report import plot_metric_vs_fraction, write_markdown
from engine.evaluate.results import ResultsFile, cell_key
from engine.evaluate.segmentation import segment
from engine.evaluate.splits import Split, make_split, train_fraction
from engine.evaluate.training import Selected

__all__ = ["ConfigError", "check_config", "run_evaluation", "write_reports"]

EncoderLoader = Callable[[str], torch.nn.Module]


class ConfigError(HistoclusterError):
    """Settings that cannot work together; the message names the flag and the fix."""


def check_config(cfg: EvalConfig) -> None:
    """Reject impossible combinations before any work starts."""
    if not cfg.encoders:
        raise ConfigError("--encoders: no encoder given — pass one or more specs, comma-separated")
    bad = [p for p in cfg.protocols if p not in ("linear", "finetune", "knn")]
    if bad:
        raise ConfigError(f"--protocol: unknown {bad[0]!r} — use linear, finetune or knn")
    if cfg.task == "segmentation" and set(cfg.protocols) != {"finetune"}:
        raise ConfigError(
            "--protocol: segmentation is evaluated by fine-tuning only (the paper omits last-layer "
            "training for segmentation) — pass --protocol finetune"
        )
    if cfg.epochs < 1:
        raise ConfigError("--epochs: must be at least 1")
    if cfg.k < 1:
        raise ConfigError("--k: must be at least 1")
    if not cfg.seeds:
        raise ConfigError("--seeds: no seed given — pass e.g. 0,1,2")
    for f in cfg.fractions:
        if not 0 < f <= 100:
            raise ConfigError(f"--fractions: {f:g} is not a percentage in (0, 100] — e.g. 1,10,100")
    if cfg.seg_scale <= 0:
        raise ConfigError("--seg-scale: must be positive")


def _check_signature(cfg: EvalConfig) -> None:
    path = cfg.out / "config.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("signature", {})
    except (OSError, json.JSONDecodeError):
        return
    new = cfg.signature()
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(
            f"{path}: results here were made with {k}={old.get(k)!r}, now {k}={new.get(k)!r} — "
            "use another --out, or the same settings to resume"
        )


def _write_config(cfg: EvalConfig, extra: dict) -> None:
    cfg.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": cfg.to_json(), "signature": cfg.signature(), **extra}
    (cfg.out / "config.json").write_text(json.dumps(payload, indent=2))


def _default_loader(trust: bool) -> EncoderLoader:
    def load(spec: str) -> torch.nn.Module:
        from engine.models import load_encoder

        return load_encoder(spec, trust_checkpoint=trust)

    return load


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


def run_evaluation(cfg: EvalConfig, load_encoder: EncoderLoader | None = None) -> Path:
    """Run every unfinished cell of ``cfg``'s grid; returns ``OUT/results.csv``.

    ``load_encoder(spec) -> Encoder`` defaults to :func:`engine.models.load_encoder`.
    Raises :class:`~engine.errors.HistoclusterError` subclasses for bad input.
    """
    check_config(cfg)
    cfg.out = Path(cfg.out)
    _check_signature(cfg)
    load = load_encoder or _default_loader(cfg.trust_checkpoint)
    progress = not cfg.quiet and sys.stderr.isatty()

    samples = load_samples(cfg.dataset, cfg.task)
    samples, skipped = drop_undecodable(samples, workers=max(1, cfg.workers), progress=progress)
    cfg.out.mkdir(parents=True, exist_ok=True)
    if skipped:
        listing = "\n".join(f"{p}\t{reason}" for p, reason in sorted(skipped.items()))
        (cfg.out / "skipped_files.txt").write_text(listing + "\n")
        print(
            f"warning: {len(skipped)} file(s) could not be decoded and were skipped — "
            f"listed in {cfg.out / 'skipped_files.txt'}",
            file=sys.stderr,
        )
    plan = _splits(cfg, samples)
    device = resolve_device(cfg.device)
    _write_config(
        cfg,
        {
            "dataset": {
                "samples": len(samples),
                "classes": samples.classes,
                "own_split": samples.split is not None,
                "skipped_files": len(skipped),
            },
            "device": str(device),
        },
    )

    results = ResultsFile(cfg.out / "results.csv", cfg.task)
    done = results.finished()
    cells = [
        (enc, proto, f, seed)
        for enc in cfg.encoders
        for proto in cfg.protocols
        for f in cfg.fractions
        for seed in cfg.seeds
    ]
    todo = [c for c in cells if cell_key(*c) not in done]
    if len(todo) < len(cells):
        _log(cfg, f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already finished")
    # load every encoder once up front so a bad spec fails before hours of work
    encoders = {spec: load(spec) for spec in dict.fromkeys(c[0] for c in todo)}

    bar = tqdm(total=len(todo), desc="cells", disable=not progress, unit="cell")
    for spec in list(encoders):
        encoder = encoders.pop(spec)
        px = cfg.input_px or encoder.input_px
        features: np.ndarray | None = None
        for _, proto, fraction, seed in (c for c in todo if c[0] == spec):
            bar.set_postfix_str(f"{Path(spec).name} {proto} {fraction:g}% seed {seed}")
            split, train_idx = plan[(fraction, seed)]
            if proto in ("linear", "knn") and features is None:
                features, cache_path, hit = cached_features(
                    cfg.cache_dir(), encoder, samples, px, cfg.fit, device,
                    batch_size=max(cfg.batch_size, 64), workers=cfg.workers,
                    progress=progress, label=f"{Path(spec).name}-{Path(cfg.dataset).name}",
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
            cell_file.write_text(json.dumps({**row, "selected": asdict(selected)}, indent=1))
            results.append(row)
            bar.update(1)
        del encoder
    bar.close()
    write_reports(cfg)
    return results.path


def _run_cell(
    cfg: EvalConfig,
    encoder: torch.nn.Module,
    samples: Samples,
    protocol: str,
    split: Split,
    train_idx: np.ndarray,
    seed: int,
    px: int,
    features: np.ndarray | None,
    device: torch.device,
    progress: bool,
) -> Selected:
    if cfg.task == "segmentation":
        return segment(
            encoder, samples, train_idx, split.val, split.test,
            crop_px=px, scale=cfg.seg_scale, crops_per_image=cfg.seg_crops, epochs=cfg.epochs,
            lr=cfg.lr_for("finetune"), weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
            seed=seed, device=device, workers=cfg.workers, progress=progress,
        )  # fmt: skip
    if protocol == "finetune":
        return finetune(
            encoder, samples, train_idx, split.val, split.test, px, cfg.fit, epochs=cfg.epochs,
            lr=cfg.lr_for("finetune"), weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
            seed=seed, device=device, workers=cfg.workers, progress=progress,
        )  # fmt: skip
    assert features is not None and samples.targets is not None
    if protocol == "knn":
        return knn_evaluate(
            features, samples.targets, train_idx, split.val, split.test, cfg.task,
            samples.num_classes, k=cfg.k, device=device,
        )  # fmt: skip
    if protocol == "linear":
        wd = cfg.weight_decay if cfg.weight_decay is not None else paper_weight_decay(encoder.arch)
        return linear_probe(
            features, samples.targets, train_idx, split.val, split.test, cfg.task,
            samples.num_classes, epochs=cfg.epochs, lr=cfg.lr_for("linear"), weight_decay=wd,
            batch_size=cfg.batch_size, seed=seed, device=device, progress=progress,
        )  # fmt: skip
    raise DatasetError(f"unknown protocol {protocol!r}")  # unreachable after check_config
