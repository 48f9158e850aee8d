"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (paper section 3.1, eq. 1).

For a batch of N images seen as two views, every one of the 2N embeddings has one positive (the
other view of its image) and 2(N - 1) negatives (every other embedding). Similarity is cosine.
Under torchrun the negatives come from the global batch: embeddings are gathered from every rank
with gradients flowing back, so W processes with N/W images each optimise the same objective as
one process with N images (DDP's gradient averaging completes the equivalence).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import all_gather_with_grad, is_distributed

__all__ = ["NTXentLoss", "nt_xent"]


def _check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def nt_xent(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, gather: bool = True
) -> torch.Tensor:
    """Mean NT-Xent over this rank's 2n embeddings.

    z1, z2: (n, d) projections of the first and second view of the same n images (row i of z1
    and row i of z2 are a positive pair); any scale, they are l2-normalised here (in float32).
    With ``gather`` and several ranks, keys are all 2N = 2 * world_size * n embeddings.
    Returns a scalar: mean over rows r of -log(exp(s_rp / t) / sum_{k != r} exp(s_rk / t)).
    """
    _check_temperature(temperature)
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"z1 and z2 must both be (n, d); got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    if gather and is_distributed():
        import torch.distributed as dist

        k1, k2 = all_gather_with_grad(z1), all_gather_with_grad(z2)
        offset = dist.get_rank() * n
    else:
        k1, k2, offset = z1, z2, 0
    big_n = k1.shape[0]
    queries = torch.cat([z1, z2])  # (2n, d)
    keys = torch.cat([k1, k2])  # (2N, d)
    logits = queries @ keys.T / temperature  # (2n, 2N)
    idx = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + big_n])
    pos_idx = torch.cat([idx + big_n, idx])
    rows = torch.arange(2 * n, device=z1.device)
    logits[rows, self_idx] = float("-inf")
    return F.cross_entropy(logits, pos_idx)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent`; ``forward(z1 (n, d), z2 (n, d)) -> scalar``."""

    def __init__(self, temperature: float = 0.1, gather: bool = True) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = float(temperature)
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature, self.gather)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather={self.gather}"
