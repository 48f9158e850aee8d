"""Decoding image files and fitting them to an encoder's input size.

Fit modes (``--fit``):

- ``resize``: the whole image resized to ``px x px`` (aspect ratio not kept);
- ``resize-crop``: shorter side resized to ``px``, then the centre ``px x px`` square;
- ``crop``: the centre ``px x px`` square at native scale (white padding if the image is smaller).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from engine.progress import Progress, Throttle, no_progress

__all__ = [
    "FIT_MODES",
    "IMAGE_SUFFIXES",
    "FitMode",
    "find_undecodable",
    "fit_image",
    "is_image_file",
    "normalize",
    "read_rgb",
]

FitMode = Literal["resize", "resize-crop", "crop"]
FIT_MODES: tuple[str, ...] = get_args(FitMode)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})


def is_image_file(path: Path) -> bool:
    """True for a regular file whose suffix is one of :data:`IMAGE_SUFFIXES` (any case)."""
    return (
        path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith(".")
    )


def read_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file fully -> ``(H, W, 3)`` uint8 RGB; alpha is composited on white.

    Raises ``OSError`` / ``ValueError`` (PIL's errors) when the file cannot be decoded.
    """
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im)
        return np.array(im.convert("RGB"), dtype=np.uint8)


def _try_decode(path: Path) -> str | None:
    try:
        read_rgb(path)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "skip this file"
        return f"{type(exc).__name__}: {exc}"
    return None


def find_undecodable(
    paths: Sequence[Path], workers: int = 2, progress: Progress = no_progress
) -> dict[Path, str]:
    """Decode every file once; return ``{path: reason}`` for those that fail.

    Decoding runs in ``workers`` threads (PIL releases the GIL while decoding). Reports
    ``progress("check", files decoded, files)``; a ``Cancelled`` it raises stops the scan.
    """
    bad: dict[Path, str] = {}
    report = Throttle(progress)
    report("check", 0, len(paths))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = pool.map(_try_decode, paths, chunksize=16)
        try:
            for done, (path, reason) in enumerate(zip(paths, reasons, strict=True), start=1):
                if reason is not None:
                    bad[path] = reason
                report("check", done, len(paths))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return bad


def fit_image(rgb: np.ndarray | torch.Tensor, px: int, mode: FitMode = "resize") -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, px, px)`` uint8 tensor, fitted by ``mode`` (see module doc)."""
    img = torch.as_tensor(np.ascontiguousarray(rgb)).permute(2, 0, 1)
    h, w = img.shape[-2:]
    if mode == "resize":
        if (h, w) != (px, px):
            img = TF.resize(img, [px, px], antialias=True)
    elif mode == "resize-crop":
        if min(h, w) != px:
            img = TF.resize(img, px, antialias=True)
        img = TF.center_crop(img, [px, px])
    elif mode == "crop":
        if h < px or w < px:
            pad_h, pad_w = max(0, px - h), max(0, px - w)
            img = TF.pad(
                img, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=255
            )
        img = TF.center_crop(img, [px, px])
    else:
        raise ValueError(f"unknown fit mode {mode!r}; expected one of {FIT_MODES}")
    return img.contiguous()


def normalize(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(..., 3, H, W)`` -> float32 ``(..., 3, H, W)``: ``(img / 255 - mean) / std``."""
    x = img.to(torch.float32) / 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s
