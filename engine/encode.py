"""Encoding tiles: the precision choice and ``TileEncoder`` (normalise + model at a precision).

Shared by extraction, pretraining and the benchmarks, so every path measures and runs the same code.
"""

from __future__ import annotations

import torch

from engine.errors import HistoclusterError
from engine.models import Encoder
from engine.precisions import PRECISIONS, Precision

__all__ = [
    "PRECISIONS",
    "Precision",
    "TileEncoder",
    "autocast_dtype",
    "cpu_supports_bf16",
    "resolve_precision",
]

_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    return _DTYPES.get(precision)


def cpu_supports_bf16() -> bool:
    """True when oneDNN reports native bf16 on this CPU (AVX512-BF16 / AMX), where bf16 pays off."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """``auto`` -> bf16 (or fp16 without bf16) on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise HistoclusterError(
                f"--precision {precision}: choose one of {', '.join(PRECISIONS)}"
            )
        return precision  # type: ignore[return-value]
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


class TileEncoder:
    """An :class:`Encoder` on a device at a precision: (B,H,W,3) uint8 tiles -> (B, dim) float32.

    The same code path serves extraction and the benchmark's encoder-only ceiling.
    ``batch_multiple`` > 1 pads every batch with black tiles up to a multiple of it (their
    features are dropped), so the network sees a few batch shapes however the batches are cut:
    oneDNN's primitives, cuDNN's benchmarked algorithms and the heap's blocks are made once per
    shape and reused (a chunk's last batch holds 1 to batch_size tiles).
    """

    def __init__(
        self,
        encoder: Encoder,
        device: torch.device,
        precision: str = "auto",
        channels_last: bool = True,
        batch_multiple: int = 1,
    ) -> None:
        self.device = device
        self.batch_multiple = max(1, batch_multiple)
        self.precision: Precision = resolve_precision(precision, device)
        self.channels_last = channels_last
        self.encoder = encoder.to(device).eval()
        if channels_last:
            self.encoder = self.encoder.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @torch.inference_mode()
    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 (any device) -> (B, dim) float32 on ``self.device``."""
        n = len(tiles)
        pad = -n % self.batch_multiple
        if pad:
            tiles = torch.cat([tiles, tiles.new_zeros((pad, *tiles.shape[1:]))])
        x = self.encoder.preprocess(tiles.to(self.device, non_blocking=True))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "fp32":
            return self.encoder(x).float()[:n]
        with torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision]):
            return self.encoder(x).float()[:n]
