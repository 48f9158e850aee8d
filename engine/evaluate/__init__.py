"""The evaluation suite of Ciga, Xu and Martel (section 4.2): ``python -m engine.evaluate``.

Pieces, one per module: ``config`` (:class:`EvalConfig`, every flag), ``datasets`` (finding
labelled data), ``sources`` (pixels from files or HDF5), ``images`` (decode and fit),
``loaders`` (torch Datasets), ``splits`` (50/25/25 and training fractions), ``features``
(cached frozen features), ``linear`` / ``knn`` / ``finetune`` / ``segmentation`` (the
protocols), ``training`` (the validation-selected training loop), ``metrics``, ``results``
(results.csv), ``report`` (results.md and the plot), ``runner`` (:func:`run`, the grid) and
``cli`` (:func:`main`).
"""

from engine.evaluate.cli import main
from engine.evaluate.config import EvalConfig
from engine.evaluate.datasets import DatasetError, Samples, drop_undecodable, load_samples
from engine.evaluate.runner import EvalResult, run
from engine.evaluate.splits import Split, make_split, train_fraction

__all__ = [
    "DatasetError",
    "EvalConfig",
    "EvalResult",
    "Samples",
    "Split",
    "drop_undecodable",
    "load_samples",
    "main",
    "make_split",
    "run",
    "train_fraction",
]
