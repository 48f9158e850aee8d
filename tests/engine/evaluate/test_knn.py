"""engine.evaluate.knn: cosine neighbours, votes and ties, regression means."""

from __future__ import annotations

import numpy as np
import torch

from engine.evaluate.features import LabelledFeatures
from engine.evaluate.knn import knn_evaluate, knn_predict
from engine.evaluate.splits import Split


def test_cosine_not_euclidean():
    # query points the same way as class 1's (far) sample, not the near class-0 one
    train = torch.tensor([[1.0, 0.1], [10.0, 10.0]])
    labels = torch.tensor([0, 1])
    assert knn_predict(train, labels, torch.tensor([[0.5, 0.6]]), k=1, num_classes=2).item() == 1


def test_majority_vote_and_similarity_tie_break():
    train = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.3, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[1.0, 0.2]])
    # k=4: 2 votes each; class 0's voters are more similar
    assert knn_predict(train, labels, q, k=4, num_classes=2).item() == 0
    # k larger than the bank is capped
    assert knn_predict(train, labels, q, k=50, num_classes=2).item() == 0
    labels3 = torch.tensor([0, 1, 1, 1])
    assert knn_predict(train, labels3, q, k=4, num_classes=2).item() == 1  # 3 votes beat 1


def test_knn_evaluate_on_separated_clusters_and_regression():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    y = np.repeat(np.arange(3), 30)
    x = (centres[y] + rng.normal(size=(90, 16))).astype(np.float32)
    idx = rng.permutation(90)
    split = Split(idx[:45], idx[45:68], idx[68:])
    res = knn_evaluate(LabelledFeatures(x, y, "classification", 3), split, k=5)
    assert res.test["acc"] == 1.0 and res.val["f1_macro"] == 1.0 and res.best_epoch == 0
    t = y.astype(np.float32) / 2
    reg = knn_evaluate(LabelledFeatures(x, t, "regression", 0), split, k=5)
    assert reg.test["mse"] < 1e-9 and reg.test["l1"] < 1e-6
