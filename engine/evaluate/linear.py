"""The paper's *last layer* protocol: a linear classifier (or regressor) trained with Adam on
frozen, cached encoder features; test metrics of the epoch with the best validation metric.

Features are standardised with the training subset's mean and standard deviation, the latter
floored at a tenth of its mean over features (with a handful of training samples many features
are nearly constant, and dividing by their tiny deviation would blow them up on test data).
A regressor's output is scaled to the training targets' mean and deviation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from engine.evaluate.features import LabelledFeatures
from engine.evaluate.splits import Split
from engine.evaluate.training import (
    Selected,
    TargetScale,
    TensorBatches,
    TrainSettings,
    fit_select,
    predict_metrics,
    single_thread_on_cpu,
)
from engine.progress import Progress, no_progress

__all__ = ["LINEAR", "linear_probe"]

LINEAR = TrainSettings(lr=1e-3, weight_decay=1e-5)
"""The linear protocol's defaults (a library call without settings)."""


def linear_probe(
    data: LabelledFeatures,
    split: Split,
    training: TrainSettings = LINEAR,
    progress: Progress = no_progress,
) -> Selected:
    """Train ``nn.Linear(dim, C or 1)`` on ``data.features[split.train]`` (N, dim) float32.

    ``training.weight_decay`` None means 1e-5 (:data:`LINEAR`). Returns the validation-selected
    :class:`~engine.evaluate.training.Selected`.
    """
    targets, task, num_classes = data.targets, data.task, data.num_classes
    train_idx, batch_size, seed = split.train, training.batch_size, training.seed
    device = torch.device(training.device)
    torch.manual_seed(int(seed))
    x = torch.as_tensor(data.features, dtype=torch.float32)
    mean = x[train_idx].mean(dim=0)
    std = x[train_idx].std(dim=0, unbiased=False)
    # floor: a feature (nearly) constant over a small training subset must not blow up elsewhere
    std = std.clamp_min(0.1 * float(std.mean()) + 1e-6)
    x = ((x - mean) / std).to(device)
    y = torch.as_tensor(targets).to(device)
    if task == "regression":
        y = y.float()
    out_dim = 1 if task == "regression" else num_classes
    model: nn.Module = nn.Linear(x.shape[1], out_dim)
    if task == "regression":
        t = torch.as_tensor(targets[train_idx], dtype=torch.float32)
        model = nn.Sequential(model, TargetScale(t.mean(), t.std(unbiased=False)))
    model = model.to(device)
    wd = LINEAR.weight_decay if training.weight_decay is None else training.weight_decay
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr, weight_decay=wd)

    def part(idx: np.ndarray, shuffle: bool = False) -> TensorBatches:
        i = torch.as_tensor(idx, dtype=torch.long, device=device)
        return TensorBatches(x[i], y[i], batch_size if shuffle else 4096, shuffle, seed)

    def evaluate(m: nn.Module, batches) -> dict[str, float]:
        return predict_metrics(m, batches, task, num_classes, device)

    with single_thread_on_cpu(device):
        return fit_select(
            model,
            optimizer,
            part(train_idx, shuffle=True),
            part(split.val),
            part(split.test),
            evaluate,
            task,
            training.epochs,
            device,
            progress=progress,
        )
