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
from engine.evaluate.splits import Split
from engine.evaluate.training import (
    Selected,
    TargetScale,
    TrainSettings,
    fit_select,
    predict_metrics,
)
from engine.progress import Progress, no_progress

__all__ = ["FINETUNE", "adam", "build_classifier", "finetune", "paper_weight_decay"]

FINETUNE = TrainSettings()
"""The fine-tuning defaults (also segmentation's): Adam at 1e-4, the paper's weight decay, batch 32."""


def paper_weight_decay(arch: str) -> float:
    """1e-5 for ResNet-18, 1e-4 for the others (paper, section 4.2)."""
    return 1e-5 if arch == "resnet18" else 1e-4


def build_classifier(encoder: nn.Module, out_dim: int) -> nn.Sequential:
    """A trainable copy of ``encoder.backbone`` followed by ``nn.Linear(dim, out_dim)``:
    (B, 3, H, W) -> (B, out_dim). The encoder itself is left untouched."""
    return nn.Sequential(
        copy.deepcopy(encoder.backbone), nn.Flatten(1), nn.Linear(encoder.dim, out_dim)
    )


def adam(model: nn.Module, arch: str, training: TrainSettings) -> torch.optim.Adam:
    """Adam over ``model`` at ``training.lr``; weight decay as given, else the paper's for ``arch``."""
    wd = training.weight_decay
    return torch.optim.Adam(
        model.parameters(),
        lr=training.lr,
        weight_decay=paper_weight_decay(arch) if wd is None else wd,
    )


def finetune(
    encoder: nn.Module,
    samples: Samples,
    split: Split,
    px: int,
    fit: FitMode = "resize",
    training: TrainSettings = FINETUNE,
    progress: Progress = no_progress,
) -> Selected:
    """Fine-tune ``encoder`` (a :class:`engine.models.Encoder`) for classification or regression
    on ``samples[split.train]``; select the epoch on ``split.val``; report ``split.test``."""
    device = torch.device(training.device)
    batch_size, seed, workers = training.batch_size, training.seed, training.workers
    torch.manual_seed(int(seed))
    task = samples.task
    out_dim = 1 if task == "regression" else samples.num_classes
    model = build_classifier(encoder, out_dim)
    if task == "regression":
        t = np.asarray(samples.targets[split.train], dtype=np.float64)
        model.append(TargetScale(t.mean(), t.std()))
    model = model.to(device)
    optimizer = adam(model, encoder.arch, training)

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
        loader(split.train, True),
        loader(split.val, False),
        loader(split.test, False),
        evaluate,
        task,
        training.epochs,
        device,
        progress=progress,
    )
