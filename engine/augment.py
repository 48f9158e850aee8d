"""SimCLR augmentations for histopathology with the paper's presets (section 4.1).

Per view, in this order: a random resized crop covering ``crop_min``..100% of the area (aspect
ratio 3/4..4/3, resized back to ``size``), a rotation by 0/90/180/270 degrees with equal chance,
horizontal and vertical flips at 50%, colour jitter (brightness, contrast, saturation, hue) with
one of the presets light (0.4, 0.4, 0.4, 0.2), medium (0.8, 0.8, 0.8, 0.2), heavy (0.8, 0.8, 0.8,
0.4), applied with probability ``jitter_p`` (0.8 as in Chen et al. 2020; the paper names no
probability) in a random order per image, and a Gaussian blur half the time with sigma ~ U[0.1,
2.0] and an odd kernel of about 0.1 x the side. Then float conversion and normalisation.

Two implementations of the same distribution:

- :func:`build_transform`: torchvision ``transforms.v2``, one image at a time, for DataLoader
  workers (input uint8 (3, H, W) tensor or PIL image -> float (3, size, size)).
- :class:`BatchAugment`: the same operations batched over (B, 3, H, W) tensors on any device
  (every image draws its own parameters), so on CUDA the loader only decodes and the GPU
  augments. Each batched colour/blur op is tested against its ``transforms.v2.functional``
  counterpart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import tv_tensors
from torchvision.ops import roi_align
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

from engine.models import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "JITTER_PRESETS",
    "AugmentConfig",
    "BatchAugment",
    "RandomRot90",
    "TwoViews",
    "blur_kernel_size",
    "build_transform",
]

#: (brightness, contrast, saturation, hue) of the paper's colour-jitter settings.
JITTER_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "none": (0.0, 0.0, 0.0, 0.0),
    "light": (0.4, 0.4, 0.4, 0.2),
    "medium": (0.8, 0.8, 0.8, 0.2),
    "heavy": (0.8, 0.8, 0.8, 0.4),
}


@dataclass(frozen=True)
class AugmentConfig:
    """One view's augmentation. Defaults: the paper's best run (1% crops, heavy jitter)."""

    size: int = 224
    crop_min: float = 0.01
    jitter: str = "heavy"
    hue: float | None = None  # overrides the preset's hue strength; None keeps it
    jitter_p: float = 0.8
    flip_p: float = 0.5
    rotate90: bool = True
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_frac: float = 0.1
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8 px, got {self.size}")
        if not 0.0 < self.crop_min <= 1.0:
            raise ValueError(f"crop_min must be in (0, 1], got {self.crop_min}")
        if self.jitter not in JITTER_PRESETS:
            raise ValueError(
                f"unknown jitter preset {self.jitter!r}; choose one of {', '.join(JITTER_PRESETS)}"
            )
        if self.hue is not None and not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        for name in ("jitter_p", "flip_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def jitter_strength(self) -> tuple[float, float, float, float]:
        """(brightness, contrast, saturation, hue) of the preset, with ``hue`` when given."""
        bri, con, sat, hue = JITTER_PRESETS[self.jitter]
        return bri, con, sat, hue if self.hue is None else self.hue

    @property
    def blur_kernel(self) -> int:
        return blur_kernel_size(self.size, self.blur_frac)


def blur_kernel_size(side: int, frac: float = 0.1) -> int:
    """The odd kernel nearest to ``frac`` x ``side`` px, at least 3 (224 -> 23, 128 -> 13, 96 -> 9)."""
    return max(3, 2 * int(round((frac * side - 1) / 2)) + 1)


class RandomRot90(v2.Transform):
    """Rotate by k x 90 degrees, k uniform in {0, 1, 2, 3}; exact (no interpolation)."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"k": int(torch.randint(4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        k = params["k"]
        if k == 0:
            return inpt
        if isinstance(inpt, torch.Tensor):
            out = torch.rot90(inpt, k, dims=(-2, -1))
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.TVTensor) else out
        return v2.functional.rotate(inpt, 90.0 * k, expand=True)


def _color_jitter(cfg: AugmentConfig) -> list[v2.Transform]:
    b, c, s, h = cfg.jitter_strength
    if cfg.jitter_p == 0 or not any((b, c, s, h)):
        return []
    return [v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=cfg.jitter_p)]


def build_transform(cfg: AugmentConfig) -> v2.Compose:
    """Per-image pipeline: uint8 (3, H, W) tensor / PIL / (H, W, 3) via ToImage -> float (3, size, size)."""
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(cfg.size, scale=(cfg.crop_min, 1.0), antialias=True),
    ]
    if cfg.rotate90:
        steps.append(RandomRot90())
    if cfg.flip_p > 0:
        steps += [v2.RandomHorizontalFlip(cfg.flip_p), v2.RandomVerticalFlip(cfg.flip_p)]
    steps += _color_jitter(cfg)
    if cfg.blur_p > 0:
        blur = v2.GaussianBlur(cfg.blur_kernel, sigma=cfg.blur_sigma)
        steps.append(v2.RandomApply([blur], p=cfg.blur_p))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(cfg.mean), list(cfg.std))]
    return v2.Compose(steps)


class TwoViews:
    """``view_a, view_b = TwoViews(t)(image)``: two independent draws of the same transform."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


# --- batched operations: x is float (B, 3, H, W) in [0, 1], factors are (B,) ------------------


def _per_image(f: torch.Tensor) -> torch.Tensor:
    return f.to(torch.float32).view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma with torchvision's weights."""
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).to(x.dtype)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    r = _per_image(ratio)
    return (r * x + (1.0 - r) * other).clamp_(0.0, 1.0)


def batched_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp_(0.0, 1.0)


def batched_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def batched_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, _gray(x), factor)


def batched_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift hue by ``shift`` (B,) in [-0.5, 0.5] turns, per image."""
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0] + shift.to(x.dtype).view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), dim=1))


def batched_gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with per-image ``sigma`` (B,), reflect padding (as torchvision)."""
    b, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma.to(x.device, torch.float32)[:, None]) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).to(x.dtype)  # (B, K)
    k = k.repeat_interleave(c, dim=0)  # (B*C, K)
    pad = kernel_size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, h, w)


def sample_crop_boxes(
    batch: int, height: int, width: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> torch.Tensor:
    """RandomResizedCrop's parameter draw for ``batch`` images -> (B, 4) float (x0, y0, x1, y1).

    Ten tries per image as torchvision does; images with no valid try fall back to the largest
    centred crop of an allowed aspect ratio.
    """
    tries = 10
    area = height * width
    target = area * torch.empty(batch, tries).uniform_(scale[0], scale[1])
    log_r = torch.empty(batch, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    ar = torch.exp(log_r)
    w = torch.sqrt(target * ar).round()
    h = torch.sqrt(target / ar).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((batch,), -1))
    rows = torch.arange(batch)
    w, h = w[rows, first.clamp(min=0)], h[rows, first.clamp(min=0)]
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    bad = first < 0
    w = torch.where(bad, torch.tensor(float(fw)), w)
    h = torch.where(bad, torch.tensor(float(fh)), h)
    x0 = torch.floor(torch.rand(batch) * (width - w + 1))
    y0 = torch.floor(torch.rand(batch) * (height - h + 1))
    x0 = torch.where(bad, torch.tensor(float((width - fw) // 2)), x0)
    y0 = torch.where(bad, torch.tensor(float((height - fh) // 2)), y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def batched_resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``boxes`` (B, 4) pixel (x0, y0, x1, y1) from ``x`` (B, C, H, W), resize to ``size``.

    Bilinear (half-pixel centres), averaging several samples per output pixel when shrinking.
    Equal to ``v2.functional.resized_crop`` when enlarging, except on the outermost ring of
    output pixels, which blends in the image just outside the crop instead of repeating its edge.
    """
    b = x.shape[0]
    idx = torch.arange(b, device=x.device, dtype=x.dtype)[:, None]
    rois = torch.cat([idx, boxes.to(x.device, x.dtype)], dim=1)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def batched_rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate image i by k[i] x 90 degrees (square images)."""
    out = x.clone()
    for q in (1, 2, 3):
        sel = (k == q).nonzero().flatten().to(x.device)
        if sel.numel():
            out[sel] = torch.rot90(x[sel], q, dims=(2, 3))
    return out


class BatchAugment(nn.Module):
    """The :func:`build_transform` distribution on a batch, every image with its own parameters.

    forward(x: uint8 (B, 3, H, W) or float in [0, 1], any device) -> float (B, 3, size, size),
    normalised. Parameters are drawn from torch's global CPU generator (reproducible under
    ``torch.manual_seed``); the pixel work runs on ``x``'s device. Square inputs only.
    """

    def __init__(self, cfg: AugmentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        b, _, h, w = x.shape
        dev = x.device
        boxes = sample_crop_boxes(b, h, w, (cfg.crop_min, 1.0))
        x = batched_resized_crop(x, boxes, cfg.size).clamp_(0.0, 1.0)
        if cfg.rotate90:
            x = batched_rot90(x, torch.randint(4, (b,)))
        if cfg.flip_p > 0:
            hflip = (torch.rand(b) < cfg.flip_p).to(dev).view(-1, 1, 1, 1)
            x = torch.where(hflip, x.flip(3), x)
            vflip = (torch.rand(b) < cfg.flip_p).to(dev).view(-1, 1, 1, 1)
            x = torch.where(vflip, x.flip(2), x)
        x = self._jitter(x)
        if cfg.blur_p > 0:
            sel = (torch.rand(b) < cfg.blur_p).nonzero().flatten()
            if sel.numel():
                sigma = torch.empty(sel.numel()).uniform_(*cfg.blur_sigma)
                sel = sel.to(dev)
                x[sel] = batched_gaussian_blur(x[sel], cfg.blur_kernel, sigma)
        return (x - self.mean) / self.std

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        bri, con, sat, hue = self.cfg.jitter_strength
        if self.cfg.jitter_p == 0 or not any((bri, con, sat, hue)):
            return x
        b, dev = x.shape[0], x.device
        apply = torch.rand(b) < self.cfg.jitter_p
        # factors as ColorJitter draws them: U[max(0, 1 - s), 1 + s], hue U[-h, h]
        factors = [
            torch.empty(b).uniform_(max(0.0, 1 - s), 1 + s) if s > 0 else None
            for s in (bri, con, sat)
        ]
        factors.append(torch.empty(b).uniform_(-hue, hue) if hue > 0 else None)
        ops = (batched_brightness, batched_contrast, batched_saturation, batched_hue)
        order = torch.rand(b, 4).argsort(dim=1)  # a random order of the 4 ops per image
        for slot in range(4):
            for op_id, op in enumerate(ops):
                if factors[op_id] is None:
                    continue
                sel = ((order[:, slot] == op_id) & apply).nonzero().flatten()
                if sel.numel():
                    sel_d = sel.to(dev)
                    x[sel_d] = op(x[sel_d], factors[op_id][sel].to(dev))
        return x

    def extra_repr(self) -> str:
        return repr(self.cfg)
