"""The evaluation suite of Ciga, Xu and Martel (section 4.2): ``python -m engine.evaluate``.

Pieces, one per module: ``datasets`` (finding labelled data), ``sources`` (pixels from files or
HDF5), ``images`` (decode and fit), ``loaders`` (torch Datasets), ``splits`` (50/25/25 and
training fractions), ``features`` (cached frozen features), ``linear`` / ``knn`` / ``finetune``
/ ``segmentation`` (the protocols), ``training`` (the validation-selected training loop),
``metrics``, ``results`` (results.csv), ``report`` (results.md and the plot), ``runner`` (the
grid) and ``cli``.
"""

from engine.evaluate.config import EvalConfig
from engine.evaluate.datasets import DatasetError, Samples, drop_undecodable, load_samples
from engine.evaluate.splits import Split, make_split, train_fraction

__all__ = [
    "DatasetError",
    "EvalConfig",
    "Samples",
    "Split",
    "drop_undecodable",
    "load_samples",
    "make_split",
    "run_evaluation",
    "train_fraction",
]


def __getattr__(name: str):
    if name == "run_evaluation":
        from engine.evaluate.runner import run_evaluation

        return run_evaluation
    raise AttributeError(name)
