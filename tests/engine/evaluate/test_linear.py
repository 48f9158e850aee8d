"""The linear probe on real encoder features of generated data with a known answer:
colour-separated classes are separated, shuffled labels stay at chance."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.evaluate.datasets import load_samples
from engine.evaluate.features import (
    FeatureSettings,
    LabelledFeatures,
    cached_features,
    compute_features,
    feature_cache_key,
)
from engine.evaluate.linear import LINEAR, linear_probe
from engine.evaluate.splits import Split, make_split, train_fraction


@pytest.fixture(scope="module")
def colour_features(colour_folder, random_encoder, tmp_path_factory):
    samples = load_samples(colour_folder, "classification")
    cache = tmp_path_factory.mktemp("cache")
    feats, path, hit = cached_features(
        cache, random_encoder, samples, FeatureSettings(32), label="colours"
    )
    assert not hit and path.is_file()
    return samples, feats, cache


def test_features_shape_and_cache_hit(colour_features, random_encoder):
    samples, feats, cache = colour_features
    assert feats.shape == (120, 512) and feats.dtype == np.float32
    again, _, hit = cached_features(
        cache, random_encoder, samples, FeatureSettings(32), label="colours"
    )
    assert hit
    np.testing.assert_array_equal(again, feats)
    direct = compute_features(random_encoder, samples.select([0, 5]), FeatureSettings(32))
    np.testing.assert_allclose(direct, feats[[0, 5]], rtol=1e-4, atol=1e-5)


def test_cache_key_follows_weights_size_and_data(colour_features, random_encoder):
    samples, _, _ = colour_features
    key = feature_cache_key(random_encoder, samples, 32, "resize")
    other = copy.deepcopy(random_encoder)
    with torch.no_grad():
        other.backbone.conv1.weight.add_(1e-3)
    assert feature_cache_key(other, samples, 32, "resize") != key
    assert feature_cache_key(random_encoder, samples, 64, "resize") != key
    assert feature_cache_key(random_encoder, samples.select(range(10)), 32, "resize") != key


def test_colour_classes_are_separated(colour_features):
    samples, feats, _ = colour_features
    split = make_split(samples, seed=0)
    data = LabelledFeatures(feats, samples.targets, "classification", 3)
    res = linear_probe(data, split, replace(LINEAR, epochs=30, seed=0))
    assert res.test["f1_macro"] >= 0.95 and res.test["acc"] >= 0.95
    assert 1 <= res.best_epoch <= 30 and len(res.history) == 30


def test_colour_classes_separated_from_ten_percent_of_train(colour_features):
    samples, feats, _ = colour_features
    split = make_split(samples, seed=1)
    sub = train_fraction(samples, split.train, 10, seed=1)
    assert len(sub) == 6
    data = LabelledFeatures(feats, samples.targets, "classification", 3)
    res = linear_probe(data, replace(split, train=sub), replace(LINEAR, epochs=30, seed=1))
    assert res.test["f1_macro"] >= 0.95


def test_shuffled_labels_give_chance(colour_features):
    samples, feats, _ = colour_features
    accs = []
    for seed in range(3):
        shuffled = np.random.default_rng(seed).permutation(samples.targets)
        s = copy.copy(samples)
        s.targets = shuffled
        split = make_split(s, seed=seed)
        data = LabelledFeatures(feats, shuffled, "classification", 3)
        res = linear_probe(data, split, replace(LINEAR, epochs=30, seed=seed))
        accs.append(res.test["acc"])
    # 3 classes: chance is 1/3; 3 x 30 test samples give a standard error of about 0.05
    assert abs(np.mean(accs) - 1 / 3) < 0.15, accs


def test_linear_regression_recovers_a_linear_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x @ rng.normal(size=8) * 0.1 + 0.5).astype(np.float32)
    idx = rng.permutation(200)
    res = linear_probe(
        LabelledFeatures(x, y, "regression", 0),
        Split(idx[:100], idx[100:150], idx[150:]),
        replace(LINEAR, epochs=60, lr=1e-2),
    )
    baseline = float(np.mean((y[idx[150:]] - y[idx[:100]].mean()) ** 2))
    assert res.test["mse"] < 0.05 * baseline
    assert res.test["l1"] < 0.1
