"""Segmentation: smp's U-Net gets our encoder's weights, and a short run on real MoNuSeg crops
beats predicting all background."""

from __future__ import annotations

import pytest
import torch

from engine.errors import CheckpointError
from engine.evaluate.datasets import load_samples
from engine.evaluate.loaders import SegmentationDataset, make_loader
from engine.evaluate.segmentation import build_unet, constant_prediction_metrics, segment
from engine.evaluate.splits import make_split
from engine.evaluate.training import TrainSettings


def test_unet_encoder_holds_our_backbone_weights(random_encoder):
    unet = build_unet(random_encoder, num_classes=3)
    ours = random_encoder.backbone.state_dict()
    theirs = unet.encoder.state_dict()
    for name in ("conv1.weight", "layer4.1.bn2.running_var", "layer2.0.downsample.0.weight"):
        assert torch.equal(ours[name], theirs[name])
    assert unet(torch.zeros(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_unet_rejects_weights_that_do_not_fit(random_encoder):
    import copy

    broken = copy.deepcopy(random_encoder)
    broken.backbone.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match=r"unexpected \['extra.bias', 'extra.weight'\]"):
        build_unet(broken, num_classes=2)


def test_dataset_refuses_a_mask_of_another_size(tmp_path, random_encoder):
    """Samples built by a library caller (not through load_samples' check) are refused too."""
    import numpy as np
    from PIL import Image

    from engine.evaluate.datasets import DatasetError, Samples
    from engine.evaluate.sources import FileImages

    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a_mask.png")
    samples = Samples("segmentation", tmp_path, FileImages([tmp_path / "a.png"]), None,
                      ["0", "1"], masks=[tmp_path / "a_mask.png"])  # fmt: skip
    ds = SegmentationDataset(samples, random_encoder.mean, random_encoder.std, scale=0.5)
    with pytest.raises(
        DatasetError, match=r"a_mask.png: mask is 16x16 px but its image .*a.png is 32x32"
    ):
        ds[0]
    Image.fromarray(np.ones((32, 32), np.uint8)).save(tmp_path / "a_mask.png")
    x, mask = ds[0]  # the right size: scaled with its image, then padded to 32
    assert x.shape == (3, 32, 32) and mask.shape == (32, 32)
    assert (mask[:16, :16] == 1).all() and (mask[16:, :] == -1).all()


@pytest.mark.slow
def test_monuseg_short_run_beats_all_background(shared_data, random_encoder):
    samples = load_samples(shared_data / "segmentation" / "monuseg-subset", "segmentation")
    split = make_split(samples, seed=0)
    assert split.sizes() == (4, 2, 2)
    res = segment(
        random_encoder, samples, split, crop_px=128, scale=0.25, crops_per_image=4,
        training=TrainSettings(epochs=4, lr=1e-3, batch_size=8, seed=0),
    )  # fmt: skip
    test_pixels = make_loader(
        SegmentationDataset(samples.select(split.test), random_encoder.mean, random_encoder.std, 0.25),
        batch_size=1, shuffle=False, workers=0,
    )  # fmt: skip
    background = constant_prediction_metrics(test_pixels, num_classes=2, label=0)
    assert 0.3 < background["f1_macro"] < 0.5  # background Dice ~0.8, nuclei Dice 0
    assert res.test["f1_macro"] > background["f1_macro"] + 0.05, (res.test, background)
