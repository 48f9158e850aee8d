"""engine.evaluate.metrics against scikit-learn, and the validation-selection rule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score

from engine.evaluate.metrics import (
    classification_metrics,
    confusion_counts,
    is_better,
    regression_metrics,
    segmentation_metrics,
)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_segmentation_metrics_equal_sklearn_on_flat_pixels(num_classes):
    rng = np.random.default_rng(num_classes)
    truth = rng.integers(0, num_classes, size=(3, 20, 20))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, num_classes, truth.shape))
    m = segmentation_metrics(confusion_counts(truth, pred, num_classes))
    assert m["f1_micro"] == pytest.approx(f1_score(truth.ravel(), pred.ravel(), average="micro"))
    assert m["f1_macro"] == pytest.approx(f1_score(truth.ravel(), pred.ravel(), average="macro"))


def test_binary_dice_and_ignored_padding():
    truth = np.array([[1, 1, 0, 0, -1]])
    pred = np.array([[1, 0, 0, 0, 1]])
    m = segmentation_metrics(confusion_counts(truth, pred, 2))
    # foreground Dice 2*1/(2+1), background Dice 2*2/(2+3); padding (-1) ignored
    assert m["f1_macro"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["f1_micro"] == pytest.approx(3 / 4)


def test_classification_and_regression_metrics():
    m = classification_metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert m["acc"] == pytest.approx(0.75)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    r = regression_metrics(np.array([0.0, 1.0]), np.array([0.5, 0.0]))
    assert r == pytest.approx({"mse": (0.25 + 1) / 2, "l1": 0.75})


def test_selection_direction():
    assert is_better("classification", {"f1_macro": 0.6}, {"f1_macro": 0.5})
    assert not is_better("classification", {"f1_macro": 0.5}, {"f1_macro": 0.5})
    assert is_better("regression", {"mse": 0.1}, {"mse": 0.2})
    assert not is_better("regression", {"mse": 0.3}, {"mse": 0.2})
