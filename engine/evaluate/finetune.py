"""The paper's *fine-tuning* protocol: the whole encoder plus a linear head trained with Adam,
batch 32, weight decay 1e-5 for ResNet-18 and 1e-4 otherwise; training images get random
90-degree rotations and flips. Test metrics of the epoch with the best validation metric.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from engine.evaluate.datasets import Samples
from engine.evaluate.images import FitMode
from engine.evaluate.loaders import ImageDataset, make_loader
from engine.evaluate.training import Selected, TargetScale, fit_select, predict_metrics
from engine.progress import Progress, no_progress

__all__ = ["build_classifier", "finetune", "paper_weight_decay"]


def paper_weight_decay(arch: str) -> float:
    """1e-5 for ResNet-18, 1e-4 for the others (paper, section 4.2)."""
    return 1e-5 if arch == "resnet18" else 1e-4


def build_classifier(encoder: nn.Module, out_dim: int) -> nn.Sequential:
    """A trainable copy of ``encoder.backbone`` followed by ``nn.Linear(dim, out_dim)``:
    (B, 3, H, W) -> (B, out_dim). The encoder itself is left untouched."""
    return nn.Sequential(
        copy.deepcopy(encoder.backbone), nn.Flatten(1), nn.Linear(encoder.dim, out_dim)
    )


def finetune(
    encoder: nn.Module,
    samples: Samples,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    test_idx: np.ndarray,
    px: int,
    fit: FitMode = "resize",
    epochs: int = 100,
    lr: float = 1e-4,
    weight_decay: float | None = None,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    workers: int = 0,
    progress: Progress = no_progress,
) -> Selected:
    """Fine-tune ``encoder`` (a :class:`engine.models.Encoder`) for classification or regression
    on ``samples[train_idx]``; select the epoch on ``val_idx``; report ``test_idx``."""
    device = torch.device(device)
    torch.manual_seed(int(seed))
    task = samples.task
    out_dim = 1 if task == "regression" else samples.num_classes
    model = build_classifier(encoder, out_dim)
    if task == "regression":
        t = np.asarray(samples.targets[train_idx], dtype=np.float64)
        model.append(TargetScale(t.mean(), t.std()))
    model = model.to(device)
    if weight_decay is None:
        weight_decay = paper_weight_decay(encoder.arch)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def loader(idx: np.ndarray, train: bool):
        ds = ImageDataset(samples.select(idx), px, encoder.mean, encoder.std, fit, augment=train)
        return make_loader(
            ds,
            batch_size if train else 2 * batch_size,
            shuffle=train,
            workers=workers,
            seed=seed,
            # a last batch of one sample breaks BatchNorm in training mode
            drop_last=train and len(idx) % batch_size == 1,
            pin_memory=device.type == "cuda",
        )

    def evaluate(m: nn.Module, batches) -> dict[str, float]:
        return predict_metrics(m, batches, task, samples.num_classes, device)

    return fit_select(
        model,
        optimizer,
        loader(train_idx, True),
        loader(val_idx, False),
        loader(test_idx, False),
        evaluate,
        task,
        epochs,
        device,
        progress=progress,
    )
