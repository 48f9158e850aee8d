"""``python -m engine.evaluate``: argparse -> :class:`EvalConfig` -> :func:`run_evaluation`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from engine.errors import HistoclusterError
from engine.evaluate.config import PROTOCOLS, EvalConfig
from engine.evaluate.datasets import TASKS
from engine.evaluate.images import FIT_MODES
from engine.evaluate.splits import PAPER_FRACTIONS

__all__ = ["build_parser", "main", "parse_config"]

_EPILOG = """\
datasets (--dataset):
  classification  ImageFolder ROOT/<class>/<image> (an engine.export folder works as is);
                  ROOT/train|val|test/<class>/<image> uses that split; a CSV path,label
                  (optional split column); PatchCamelyon-style HDF5: a file with x and y,
                  *_x.h5 beside *_y.h5, or a folder of train/valid/test pairs.
  regression      a CSV path,target (optional split column).
  segmentation    ROOT/images + ROOT/masks matched by file stem (or ROOT/train|val|test/...);
                  masks hold a class per pixel ({0,255} masks are read as 0/1).

splits: 50/25/25 train/val/test, stratified, from each seed (or --split-seed), unless the
dataset brings its own; --fractions are taken from the training split only.

outputs in --out: results.csv (one row per cell), results.md (mean ± std over seeds),
metric_vs_fraction.png, config.json, cells/*.json, features/*.npy. Re-running with the same
--out skips finished cells; more encoders/fractions/seeds/protocols can be added later.

example:
  python -m engine.evaluate --encoders resnet18-random,sample_data/sample_encoder.pt \\
      --dataset ../shared/data/patches/lc25000-lung-subset --task classification \\
      --protocol linear,knn --fractions 10,100 --seeds 0,1,2 --out runs/lc25000
"""


def _csv_list(kind: type, name: str):
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        try:
            return [kind(t.rstrip("%")) if kind is not str else t for t in items]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{name}: expected comma-separated {kind.__name__}s"
            ) from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag documented."""
    p = argparse.ArgumentParser(
        prog="python -m engine.evaluate",
        description="Evaluate encoders as Ciga, Xu and Martel do (section 4.2): linear probe, "
        "fine-tuning or kNN at several training-data fractions and seeds.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--encoders",
        required=True,
        type=_csv_list(str, "--encoders"),
        help="comma-separated encoder specs: resnet18-random, resnet50-imagenet, "
        "ciga-resnet18, or checkpoint paths",
    )
    p.add_argument("--dataset", required=True, type=Path, help="dataset path (see below)")
    p.add_argument(
        "--task", choices=TASKS, default="classification", help="default: classification"
    )
    p.add_argument(
        "--protocol",
        dest="protocols",
        type=_csv_list(str, "--protocol"),
        default=["linear"],
        help=f"comma-separated, of {', '.join(PROTOCOLS)} "
        "(segmentation: finetune only); default: linear",
    )
    p.add_argument(
        "--fractions",
        type=_csv_list(float, "--fractions"),
        default=[100.0],
        help="training-data percentages, comma-separated; the paper uses "
        f"{','.join(f'{f:g}' for f in PAPER_FRACTIONS)}; default: 100",
    )
    p.add_argument(
        "--seeds",
        type=_csv_list(int, "--seeds"),
        default=[0, 1, 2],
        help="seeds (split, subset, initialisation); default: 0,1,2",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=100,
        help="training epochs for linear, finetune and segmentation (paper: 100)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluate-out"),
        help="output folder; default: ./evaluate-out",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers; default: 2")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (paper: 32)")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate; default 1e-3 for linear, 1e-4 for fine-tuning",
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="default: 1e-5 for resnet18, 1e-4 otherwise (paper)",
    )
    p.add_argument("--k", type=int, default=20, help="neighbours for knn (cosine); default: 20")
    p.add_argument(
        "--input-px",
        type=int,
        default=None,
        help="image size fed to the encoder (segmentation: crop size); "
        "default: the encoder's own (224)",
    )
    p.add_argument(
        "--fit",
        choices=FIT_MODES,
        default="resize",
        help="how images are fitted to --input-px: resize (whole image), resize-crop "
        "(shorter side, then centre crop) or crop (centre crop, native scale); "
        "default: resize",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="fix the train/val/test split to this seed for all --seeds "
        "(default: each seed draws its own split)",
    )
    p.add_argument(
        "--seg-scale",
        type=float,
        default=1.0,
        help="segmentation: resize images and masks by this factor first; default: 1",
    )
    p.add_argument(
        "--seg-crops",
        type=int,
        default=4,
        help="segmentation: random training crops per image per epoch; default: 4",
    )
    p.add_argument(
        "--feature-cache",
        type=Path,
        default=None,
        help="folder for cached frozen features; default: OUT/features",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow pickled checkpoints (only for files you trust)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    return p


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    """Command-line arguments -> :class:`EvalConfig`."""
    ns = build_parser().parse_args(argv)
    return EvalConfig(**vars(ns))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    cfg = parse_config(argv)
    from engine.evaluate.runner import run_evaluation

    try:
        path = run_evaluation(cfg)
    except HistoclusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted — finished cells are kept in {cfg.out / 'results.csv'}; "
            "re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    if not cfg.quiet:
        print(
            f"results: {path}, {cfg.out / 'results.md'}, {cfg.out / 'metric_vs_fraction.png'}",
            file=sys.stderr,
        )
    return 0
