"""Fine-tuning: the whole network trains from the encoder's weights, the encoder itself is left
untouched, and the paper's weight decay is picked by architecture."""

from __future__ import annotations

from dataclasses import replace

import torch

from engine.evaluate.datasets import load_samples
from engine.evaluate.finetune import build_classifier, finetune, paper_weight_decay
from engine.evaluate.splits import make_split, train_fraction
from engine.evaluate.training import TrainSettings


def test_paper_weight_decay():
    assert paper_weight_decay("resnet18") == 1e-5
    assert paper_weight_decay("resnet50") == 1e-4


def test_classifier_starts_from_encoder_weights(random_encoder):
    model = build_classifier(random_encoder, 3)
    assert torch.equal(model[0].conv1.weight, random_encoder.backbone.conv1.weight)
    assert model[0].conv1.weight.data_ptr() != random_encoder.backbone.conv1.weight.data_ptr()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_finetune_learns_colours_and_leaves_encoder_alone(colour_folder, random_encoder):
    samples = load_samples(colour_folder, "classification")
    split = make_split(samples, seed=0)
    train = train_fraction(samples, split.train, 50, seed=0)
    before = random_encoder.backbone.conv1.weight.clone()
    res = finetune(
        random_encoder, samples, replace(split, train=train), px=32,
        training=TrainSettings(epochs=2, lr=1e-3, batch_size=16, seed=0),
    )  # fmt: skip
    assert torch.equal(random_encoder.backbone.conv1.weight, before)
    assert 1 <= res.best_epoch <= 2 and len(res.history) == 2
    assert set(res.test) == {"acc", "f1_macro"}
    assert res.test["acc"] > 0.8  # chance is 1/3


def test_finetune_regression_head_starts_at_the_target_mean(tmp_path, random_encoder):
    import numpy as np
    from PIL import Image

    lines = ["path,target"]
    for i in range(12):
        Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{50 + i}")  # targets in percent: far from 0
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    samples = load_samples(tmp_path / "t.csv", "regression")
    split = make_split(samples, seed=0)
    res = finetune(
        random_encoder, samples, split, px=32, training=TrainSettings(epochs=1, batch_size=4)
    )
    assert set(res.test) == {"mse", "l1"}
    # an unscaled head would predict ~0 for targets around 55 (L1 ~55)
    assert res.test["l1"] < 15
