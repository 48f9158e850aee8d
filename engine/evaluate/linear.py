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

from engine.evaluate.training import (
    Selected,
    TargetScale,
    TensorBatches,
    fit_select,
    predict_metrics,
    single_thread_on_cpu,
)
from engine.progress import Progress, no_progress

__all__ = ["linear_probe"]


def linear_probe(
    features: np.ndarray,
    targets: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    task: str,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 1e-5,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
) -> Selected:
    """Train ``nn.Linear(dim, C or 1)`` on ``features[train_idx]`` (N, dim) float32.

    ``targets``: (N,) int64 classes or float32 regression targets. Returns the validation-selected
    :class:`~engine.evaluate.training.Selected`.
    """
    device = torch.device(device)
    torch.manual_seed(int(seed))
    x = torch.as_tensor(features, dtype=torch.float32)
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
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

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
            part(val_idx),
            part(test_idx),
            evaluate,
            task,
            epochs,
            device,
            progress=progress,
        )
