"""The training loop shared by every protocol: train for ``epochs``, evaluate on validation after
each epoch, and report the test metrics of the epoch with the best validation metric (the
paper's rule). Test is evaluated only when validation improves, with the weights of that epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.evaluate.metrics import (
    classification_metrics,
    is_better,
    regression_metrics,
)
from engine.progress import Progress, Throttle, no_progress

__all__ = [
    "Selected",
    "TrainSettings",
    "TargetScale",
    "TensorBatches",
    "fit_select",
    "loss_for",
    "predict_metrics",
    "single_thread_on_cpu",
    "ticking",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
Evaluate = Callable[[nn.Module, Batches], dict[str, float]]


@dataclass(frozen=True)
class TrainSettings:
    """What every trained protocol (linear, fine-tuning, segmentation) is given: ``epochs`` of Adam
    at ``lr`` and ``weight_decay`` (None: :func:`~engine.evaluate.finetune.paper_weight_decay` of
    the architecture), mini-batches of ``batch_size``, the ``seed`` of weights and shuffling, the
    ``device``, and ``workers`` image-loading processes (unused on cached features)."""

    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float | None = None
    batch_size: int = 32
    seed: int = 0
    device: torch.device | str = "cpu"
    workers: int = 0


@dataclass
class Selected:
    """Outcome of one training run: the epoch picked by validation and its metrics."""

    best_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class TensorBatches:
    """Mini-batches of in-memory tensors ``x (N, D)``, ``y (N,)``, reshuffled each pass when
    ``shuffle`` (seeded); much cheaper than a DataLoader for cached features."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self):
        n = len(self.x)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(self.x.device)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.x[idx], self.y[idx]


@contextlib.contextmanager
def single_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run tiny CPU work (a linear layer on cached features) on one torch thread: there,
    OpenMP threads only add synchronisation, ten times slower on a busy machine."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class TargetScale(nn.Module):
    """``out * std + mean`` with fixed (buffer) ``mean`` and ``std``: lets a regression head
    start at the training targets' mean and scale whatever the targets' units (0-1 or 0-100)."""

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(max(float(std), 1e-8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def ticking(
    batches: Batches, tick: Callable[[], None]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` with ``tick()`` called before each one (a progress report that may cancel)."""
    for batch in batches:
        tick()
        yield batch


def loss_for(task: str) -> nn.Module:
    """Cross-entropy for classification and segmentation (mask -1 ignored), MSE for regression."""
    if task == "regression":
        return nn.MSELoss()
    return nn.CrossEntropyLoss(ignore_index=-1)


def _regression_output(out: torch.Tensor) -> torch.Tensor:
    return out.reshape(len(out), -1)[:, 0]


@torch.no_grad()
def predict_metrics(
    model: nn.Module, batches: Batches, task: str, num_classes: int, device: torch.device
) -> dict[str, float]:
    """Run ``model`` over ``batches`` -> classification or regression metrics."""
    model.eval()
    truth: list[np.ndarray] = []
    pred: list[np.ndarray] = []
    for x, y in batches:
        out = model(x.to(device, non_blocking=True))
        if task == "regression":
            pred.append(_regression_output(out).float().cpu().numpy())
        else:
            pred.append(out.argmax(dim=1).cpu().numpy())
        truth.append(y.cpu().numpy())
    t, p = np.concatenate(truth), np.concatenate(pred)
    if task == "regression":
        return regression_metrics(t, p)
    return classification_metrics(t, p, num_classes)


def fit_select(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Batches,
    val: Batches,
    test: Batches,
    evaluate: Evaluate,
    task: str,
    epochs: int,
    device: torch.device,
    progress: Progress = no_progress,
    stage: str = "train",
) -> Selected:
    """Train ``model`` for ``epochs`` on ``train``; after each epoch evaluate on ``val``; when it
    improves (:func:`~engine.evaluate.metrics.is_better`), evaluate on ``test``.

    ``evaluate(model, batches) -> metrics``. Returns the test metrics of the best epoch.
    Reports ``progress(stage, steps done, epochs x steps per epoch)`` (at most 5 times a second,
    and during validation and test batches too); a ``Cancelled`` it raises stops training.
    """
    loss_fn = loss_for(task)
    best_val: dict[str, float] | None = None
    best_test: dict[str, float] = {}
    best_epoch = 0
    history: list[dict[str, float]] = []
    report = Throttle(progress)
    per_epoch = max(len(train), 1)  # type: ignore[arg-type]
    total = epochs * per_epoch
    done = 0

    def tick() -> None:
        report(stage, done, total)

    tick()
    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum, count = 0.0, 0
        for step, (x, y) in enumerate(train, start=1):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            out = model(x)
            if task == "regression":
                loss = loss_fn(_regression_output(out), y.float())
            else:
                loss = loss_fn(out, y.long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(x)
            count += len(x)
            done = (epoch - 1) * per_epoch + min(step, per_epoch)
            tick()
        done = epoch * per_epoch
        val_metrics = evaluate(model, ticking(val, tick))
        history.append({"epoch": epoch, "loss": loss_sum / max(count, 1), **val_metrics})
        if is_better(task, val_metrics, best_val):
            best_val, best_epoch = val_metrics, epoch
            best_test = evaluate(model, ticking(test, tick))
        tick()
    assert best_val is not None, "epochs must be >= 1"
    return Selected(best_epoch, best_val, best_test, history)
