"""The paper's metrics: accuracy and macro F1 (classification), MSE and L1 (regression),
micro and macro F1 over pixels (segmentation; macro F1 = mean per-class Dice, micro F1 = pixel
accuracy). Which validation metric selects the reported epoch is :data:`SELECTION`.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, mean_squared_error

__all__ = [
    "METRICS",
    "SELECTION",
    "classification_metrics",
    "confusion_counts",
    "is_better",
    "regression_metrics",
    "segmentation_metrics",
]

#: metric names per task, in report order
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("acc", "f1_macro"),
    "regression": ("mse", "l1"),
    "segmentation": ("f1_micro", "f1_macro"),
}
#: (validation metric that selects the epoch, True if higher is better)
SELECTION: dict[str, tuple[str, bool]] = {
    "classification": ("f1_macro", True),
    "regression": ("mse", False),
    "segmentation": ("f1_macro", True),
}


def is_better(task: str, new: dict[str, float], best: dict[str, float] | None) -> bool:
    """True if validation metrics ``new`` beat ``best`` under :data:`SELECTION` (ties keep the old)."""
    if best is None:
        return True
    key, higher = SELECTION[task]
    return new[key] > best[key] if higher else new[key] < best[key]


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> dict[str, float]:
    """(N,) int labels and predictions -> ``{"acc", "f1_macro"}`` (scikit-learn; macro F1 over
    all ``num_classes`` classes, a class absent from both counting as F1 0)."""
    labels = list(range(num_classes))
    return {
        "acc": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
    }


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """(N,) float targets and predictions -> ``{"mse", "l1"}``."""
    return {
        "mse": float(mean_squared_error(y_true, y_pred)),
        "l1": float(mean_absolute_error(y_true, y_pred)),
    }


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel (or sample) labels of any shape -> ``(C, C)`` int64 confusion matrix [true, pred].

    Labels outside ``[0, C)`` in ``y_true`` are ignored.
    """
    t = np.asarray(y_true).reshape(-1).astype(np.int64)
    p = np.asarray(y_pred).reshape(-1).astype(np.int64)
    ok = (t >= 0) & (t < num_classes)
    return np.bincount(t[ok] * num_classes + p[ok], minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def segmentation_metrics(confusion: np.ndarray) -> dict[str, float]:
    """``(C, C)`` pixel confusion -> ``{"f1_micro", "f1_macro"}``, equal to scikit-learn's
    ``f1_score(average="micro"|"macro")`` over the flattened pixels (a class absent from both
    truth and prediction is left out of the macro mean, as scikit-learn does)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    present = (support + predicted) > 0
    denom = support + predicted
    dice = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    total = confusion.sum()
    return {
        "f1_micro": float(tp.sum() / total) if total else 0.0,
        "f1_macro": float(dice[present].mean()) if present.any() else 0.0,
    }
