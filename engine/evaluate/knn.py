"""k-nearest-neighbour evaluation on frozen features with cosine similarity (k=20 default).

Classification: majority vote of the k nearest training samples, ties broken by the summed
similarity of each class's voters. Regression: mean target of the k nearest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from engine.evaluate.features import LabelledFeatures
from engine.evaluate.metrics import classification_metrics, regression_metrics
from engine.evaluate.splits import Split
from engine.evaluate.training import Selected
from engine.progress import Progress, Throttle, no_progress

__all__ = ["knn_evaluate", "knn_predict"]


@torch.no_grad()
def knn_predict(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    query_x: torch.Tensor,
    k: int = 20,
    num_classes: int | None = None,
    chunk: int = 1024,
    tick: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Cosine kNN. ``train_x`` (N, D), ``train_y`` (N,), ``query_x`` (M, D) -> (M,) predictions:
    int64 classes when ``num_classes`` is given, else float32 means of the neighbours' targets.
    ``k`` is capped at N. ``tick(queries done)`` is called before each chunk (it may cancel)."""
    k = min(int(k), len(train_x))
    t = F.normalize(train_x.float(), dim=1)
    preds: list[torch.Tensor] = []
    for start in range(0, len(query_x), chunk):
        if tick is not None:
            tick(start)
        q = F.normalize(query_x[start : start + chunk].float(), dim=1)
        sims, nn_idx = (q @ t.T).topk(k, dim=1)  # (m, k)
        labels = train_y[nn_idx]
        if num_classes is None:
            preds.append(labels.float().mean(dim=1))
            continue
        votes = torch.zeros(len(q), num_classes, device=q.device)
        votes.scatter_add_(1, labels.long(), torch.ones_like(sims))
        tie_break = torch.zeros_like(votes).scatter_add_(1, labels.long(), sims)
        # similarities sum to at most k in magnitude, so this never overturns a vote count
        preds.append((votes + tie_break / (2 * k + 1)).argmax(dim=1))
    return torch.cat(preds)


def knn_evaluate(
    data: LabelledFeatures,
    split: Split,
    k: int = 20,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
) -> Selected:
    """kNN with ``data.features[split.train]`` as the memory bank; metrics on validation and test
    (``best_epoch`` 0: nothing is trained). Reports ``progress("train", queries done, all)``."""
    targets, task, num_classes = data.targets, data.task, data.num_classes
    x = torch.as_tensor(data.features, dtype=torch.float32, device=device)
    y = torch.as_tensor(targets, device=device)
    n_cls = None if task == "regression" else num_classes
    train_i = torch.as_tensor(split.train, dtype=torch.long, device=device)

    report = Throttle(progress)
    total = len(split.val) + len(split.test)

    def run(idx: np.ndarray, before: int) -> dict[str, float]:
        i = torch.as_tensor(idx, dtype=torch.long, device=device)

        def tick(n: int) -> None:
            report("train", before + n, total)

        pred = knn_predict(x[train_i], y[train_i], x[i], k, n_cls, tick=tick).cpu().numpy()
        report("train", before + len(idx), total)
        truth = targets[idx]
        if task == "regression":
            return regression_metrics(truth, pred)
        return classification_metrics(truth, pred, num_classes)

    val = run(split.val, 0)
    return Selected(best_epoch=0, val=val, test=run(split.test, len(split.val)))
