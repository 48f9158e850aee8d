"""``python -m engine.evaluate``: :class:`EvalConfig` -> :func:`run` through :func:`engine.cli.main`.

Exit status as every command: 0 done; 2 bad input or usage (one line naming the file or flag and
the fix); 130 interrupted (finished cells are kept; the same command resumes). Images that
cannot be decoded are skipped with a warning and listed in ``OUT/skipped_files.txt``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from engine import cli
from engine.evaluate.config import EvalConfig
from engine.evaluate.runner import EvalResult, run

__all__ = ["build_parser", "main", "parse_config"]

PROG = "python -m engine.evaluate"
DESCRIPTION = (
    "Evaluate encoders as Ciga, Xu and Martel do (section 4.2): linear probe, "
    "fine-tuning or kNN at several training-data fractions and seeds."
)
EPILOG = """\
datasets (--dataset):
  classification  ImageFolder ROOT/<class>/<image> (an engine.export folder works as is);
                  ROOT/train|val|test/<class>/<image> uses that split; a CSV path,label
                  (optional split column); PatchCamelyon-style HDF5: a file with x and y,
                  *_x.h5 beside *_y.h5, or a folder of train/valid/test pairs.
  regression      a CSV path,target (optional split column).
  segmentation    ROOT/images + ROOT/masks matched by file stem (or ROOT/train|val|test/...);
                  a mask is the size of its image and holds a class per pixel ({0,255} masks
                  are read as 0/1); ROOT/classes.txt may name the classes, one a line.

splits: 50/25/25 train/val/test, stratified, from each seed (or --split-seed), unless the
dataset brings its own; --fractions are taken from the training split only.

outputs in --out: results.csv (one row per cell), results.md (mean ± std over seeds),
metric_vs_fraction.png, config.json, cells/*.json, features/*.npy. Re-running with the same
--out skips finished cells; more encoders/fractions/seeds/protocols can be added later.

exit status: 0 done, 2 bad input or usage, 130 interrupted (finished cells are kept).

example:
  python -m engine.evaluate --encoders resnet18-random,sample_data/sample_encoder.pt \\
      --dataset ../shared/data/patches/lc25000-lung-subset --task classification \\
      --protocol linear,knn --fractions 10,100 --seeds 0,1,2 --out runs/lc25000
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, generated from :class:`EvalConfig`."""
    return cli.build_parser(EvalConfig, prog=PROG, description=DESCRIPTION, epilog=EPILOG)


def parse_config(argv: Sequence[str] | None = None) -> EvalConfig:
    """Command-line arguments -> :class:`EvalConfig`."""
    return cli.parse_config(EvalConfig, argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG)


def _report(cfg: EvalConfig, result: EvalResult) -> str:
    return f"results: {result.results}, {result.markdown}, {result.plot}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 bad input, 130 interrupted)."""
    return cli.main(
        EvalConfig, run, argv, prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        report=_report,
        interrupted_hint="finished cells are kept in OUT/results.csv — run the same command "
        "again to resume",
    )  # fmt: skip
