"""Fixture builders used by several test modules (real files written at run time)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image

from engine.models import IMAGENET_MEAN, IMAGENET_STD, build_backbone, save_encoder


def decode_svs_level0(path: Path) -> np.ndarray:
    """Level 0 of an SVS decoded by tifffile (independently of OpenSlide): (H, W, 3) uint8."""
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def write_pyramidal_tiff(source: Path, out: Path, levels: int = 3, tile: int = 256) -> None:
    """Write ``source``'s level 0 as a tiled pyramidal TIFF with ``levels`` levels (factor 2).

    Resolution tags carry the source's mpp (0.499 um/px for the CMU slide) so OpenSlide opens it
    as ``generic-tiff`` with that resolution.
    """
    base = decode_svs_level0(source)
    mpp = 0.499
    px_per_cm = 1e4 / mpp
    with tifffile.TiffWriter(out, bigtiff=False) as tif:
        img = base
        for level in range(levels):
            tif.write(
                img,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 95},
                resolution=(px_per_cm / 2**level, px_per_cm / 2**level),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
            )
            h, w = img.shape[:2]
            img = np.asarray(
                Image.fromarray(img).resize((w // 2, h // 2), Image.Resampling.BILINEAR)
            )


def write_seeded_resnet18(path: Path, input_px: int, config: dict | None = None) -> Path:
    """A ResNet-18 with seed-0 random weights saved as ``engine.pretrain`` saves an encoder
    (``input_px`` its tile side): a real checkpoint for plumbing tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        backbone = build_backbone("resnet18")
    save_encoder(path, backbone, "resnet18", IMAGENET_MEAN, IMAGENET_STD, input_px, config or {})
    return path
