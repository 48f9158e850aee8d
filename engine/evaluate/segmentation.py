"""Segmentation fine-tuning: a segmentation_models_pytorch U-Net whose ResNet encoder gets our
encoder's backbone weights (smp's ResNet encoders are torchvision ResNets, same parameter
names), trained whole with Adam; micro and macro F1 (Dice) over the test pixels at the epoch of
best validation macro F1.

Training uses random ``crop_px`` crops of the images (scaled by ``scale``); validation and test
run on whole scaled images padded to a multiple of 32, padding ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from engine.errors import CheckpointError
from engine.evaluate.datasets import Samples
from engine.evaluate.finetune import FINETUNE, adam
from engine.evaluate.loaders import SegmentationDataset, make_loader
from engine.evaluate.metrics import confusion_counts, segmentation_metrics
from engine.evaluate.splits import Split
from engine.evaluate.training import Selected, TrainSettings, fit_select
from engine.progress import Progress, no_progress

__all__ = ["build_unet", "constant_prediction_metrics", "segment", "segmentation_evaluate"]


def build_unet(encoder: nn.Module, num_classes: int) -> nn.Module:
    """``smp.Unet(encoder_name=encoder.arch, encoder_weights=None, classes=num_classes)`` with
    ``encoder.backbone``'s weights copied into its encoder: (B, 3, H, W) -> (B, C, H, W), H and W
    multiples of 32. Raises :class:`CheckpointError` if the weights do not fit."""
    import segmentation_models_pytorch as smp

    unet = smp.Unet(
        encoder_name=encoder.arch, encoder_weights=None, in_channels=3, classes=num_classes
    )
    state = {
        k: v
        for k, v in encoder.backbone.state_dict().items()
        if not (k.startswith("fc.") or k.startswith("avgpool."))
    }
    target = unet.encoder.state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{getattr(encoder, 'spec', encoder.arch)}: backbone does not fit smp's {encoder.arch} "
            f"encoder (missing {missing[:4]}, unexpected {unexpected[:4]}) — use a torchvision ResNet"
        )
    nn.Module.load_state_dict(unet.encoder, state, strict=True)
    return unet


@torch.no_grad()
def segmentation_evaluate(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    device: torch.device,
) -> dict[str, float]:
    """Pixel confusion over every batch (mask -1 ignored) -> ``{"f1_micro", "f1_macro"}``."""
    model.eval()
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for x, mask in batches:
        pred = model(x.to(device)).argmax(dim=1).cpu().numpy()
        confusion += confusion_counts(mask.numpy(), pred, num_classes)
    return segmentation_metrics(confusion)


def constant_prediction_metrics(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int, label: int = 0
) -> dict[str, float]:
    """The metrics of predicting ``label`` (e.g. background) for every pixel: the floor a
    trained model has to beat."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for _, mask in batches:
        m = mask.numpy()
        confusion += confusion_counts(m, np.full_like(m, label), num_classes)
    return segmentation_metrics(confusion)


def segment(
    encoder: nn.Module,
    samples: Samples,
    split: Split,
    crop_px: int = 224,
    scale: float = 1.0,
    crops_per_image: int = 4,
    training: TrainSettings = FINETUNE,
    progress: Progress = no_progress,
) -> Selected:
    """Fine-tune a U-Net over ``encoder`` on ``samples[split.train]`` image/mask pairs."""
    device = torch.device(training.device)
    batch_size, seed, workers = training.batch_size, training.seed, training.workers
    torch.manual_seed(int(seed))
    num_classes = samples.num_classes
    model = build_unet(encoder, num_classes).to(device)
    optimizer = adam(model, encoder.arch, training)
    mean, std = encoder.mean, encoder.std
    train_ds = SegmentationDataset(
        samples.select(split.train), mean, std, scale, crop_px, crops_per_image
    )
    train = make_loader(
        train_ds,
        batch_size,
        shuffle=True,
        workers=workers,
        seed=seed,
        drop_last=len(train_ds) % batch_size == 1,
    )

    def whole(idx: np.ndarray):
        return make_loader(
            SegmentationDataset(samples.select(idx), mean, std, scale), 1, False, workers
        )

    def evaluate(m: nn.Module, batches) -> dict[str, float]:
        return segmentation_evaluate(m, batches, num_classes, device)

    return fit_select(
        model,
        optimizer,
        train,
        whole(split.val),
        whole(split.test),
        evaluate,
        "segmentation",
        training.epochs,
        device,
        progress=progress,
    )
