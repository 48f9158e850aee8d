"""torch Datasets over :class:`~engine.evaluate.datasets.Samples`: images fitted to the
encoder's input and normalised, with the paper's light augmentation (90-degree rotations and
flips) for training; image/mask crops for segmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from engine.evaluate.datasets import DatasetError, Samples
from engine.evaluate.images import FitMode, fit_image, normalize

__all__ = [
    "FittedTiles",
    "ImageDataset",
    "SegmentationDataset",
    "make_loader",
    "random_dihedral",
]


def random_dihedral(*tensors: torch.Tensor, generator: torch.Generator | None = None):
    """Apply one random rotation by k*90 degrees and optional horizontal flip to every
    ``(..., H, W)`` tensor given (the same one to all)."""
    k = int(torch.randint(0, 4, (1,), generator=generator))
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, dims=(-2, -1))
        out.append(torch.flip(t, dims=(-1,)) if flip else t)
    return out if len(out) > 1 else out[0]


class ImageDataset(Dataset):
    """Item ``i`` -> ``(x (3, px, px) float32 normalised, target)``; target is an int64 class
    or a float32 regression value (0 when the samples carry none)."""

    def __init__(
        self,
        samples: Samples,
        px: int,
        mean: Sequence[float],
        std: Sequence[float],
        fit: FitMode = "resize",
        augment: bool = False,
    ) -> None:
        self.samples = samples
        self.px, self.fit, self.augment = px, fit, augment
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img = fit_image(self.samples.images.read(i), self.px, self.fit)
        if self.augment:
            img = random_dihedral(img)
        x = normalize(img, self.mean, self.std)
        targets = self.samples.targets
        if targets is None:
            return x, torch.tensor(0)
        return x, torch.as_tensor(targets[i])


class FittedTiles(Dataset):
    """Item ``i`` -> ``(px, px, 3)`` uint8, image ``i`` fitted by ``fit`` and not normalised:
    the input :class:`engine.encode.TileEncoder` takes (it normalises on the device)."""

    def __init__(self, samples: Samples, px: int, fit: FitMode = "resize") -> None:
        self.samples, self.px, self.fit = samples, px, fit

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = fit_image(self.samples.images.read(i), self.px, self.fit)
        return img.permute(1, 2, 0).contiguous()


def _read_mask(path, as_binary: bool) -> np.ndarray:
    with Image.open(path) as im:
        m = np.asarray(im).astype(np.int64)
    if as_binary:
        m = (m > 0).astype(np.int64)
    return m


def _resize_nearest(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) int64 -> (h, w) int64 by nearest neighbour (pixel centres)."""
    m = F.interpolate(mask[None, None].to(torch.float32), size=size, mode="nearest-exact")
    return m[0, 0].to(torch.int64)


class SegmentationDataset(Dataset):
    """Image/mask pairs scaled by ``scale``.

    Training (``crop_px`` set): item -> a random ``crop_px`` square crop with a random
    rotation/flip, ``crops_per_image`` items per image. Evaluation (``crop_px`` None): item ->
    the whole scaled image, padded at the bottom/right to a multiple of 32 (the U-Net's stride)
    with mask value -1 (ignored) in the padding.
    Returns ``(x (3, H, W) float32, mask (H, W) int64)``.
    """

    def __init__(
        self,
        samples: Samples,
        mean: Sequence[float],
        std: Sequence[float],
        scale: float = 1.0,
        crop_px: int | None = None,
        crops_per_image: int = 1,
    ) -> None:
        assert samples.masks is not None, "segmentation samples need masks"
        self.samples = samples
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale, self.crop_px, self.crops_per_image = scale, crop_px, crops_per_image

    def __len__(self) -> int:
        return len(self.samples) * (self.crops_per_image if self.crop_px else 1)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = torch.as_tensor(self.samples.images.read(i)).permute(2, 0, 1)
        path = self.samples.masks[i]
        mask = torch.as_tensor(_read_mask(path, self.samples.masks_255_as_1))
        if mask.shape != img.shape[-2:]:
            # a mask must label its image pixel for pixel; stretching one would mislabel it
            raise DatasetError(
                f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
                f"{self.samples.images.name(i)} is {img.shape[2]}x{img.shape[1]} — "
                "give every image a mask of its own size"
            )
        if self.scale != 1.0:
            h, w = img.shape[-2:]
            size = [max(1, round(h * self.scale)), max(1, round(w * self.scale))]
            img = TF.resize(img, size)
            mask = _resize_nearest(mask, (size[0], size[1]))
        return img, mask

    def __getitem__(self, item: int):
        i = item // self.crops_per_image if self.crop_px else item
        img, mask = self._load(i)
        if self.crop_px:
            p = self.crop_px
            h, w = img.shape[-2:]
            if h < p or w < p:
                ph, pw = max(0, p - h), max(0, p - w)
                img = F.pad(img, (0, pw, 0, ph), value=255)
                mask = F.pad(mask, (0, pw, 0, ph), value=-1)
                h, w = img.shape[-2:]
            top = int(torch.randint(0, h - p + 1, (1,)))
            left = int(torch.randint(0, w - p + 1, (1,)))
            img = img[:, top : top + p, left : left + p]
            mask = mask[top : top + p, left : left + p]
            img, mask = random_dihedral(img, mask)
        else:
            h, w = img.shape[-2:]
            ph, pw = (-h) % 32, (-w) % 32
            if ph or pw:
                img = F.pad(img, (0, pw, 0, ph), value=255)
                mask = F.pad(mask, (0, pw, 0, ph), value=-1)
        return normalize(img.contiguous(), self.mean, self.std), mask.contiguous()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader with a seeded shuffle and persistent workers off (short runs)."""
    g = torch.Generator()
    g.manual_seed(int(seed))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=g,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )
