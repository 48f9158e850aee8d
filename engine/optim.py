"""Optimizers and learning-rate schedule of the paper (section 4.1).

LARS and LAMB are timm's implementations (``timm.optim.Lars``, ``timm.optim.Lamb``); Adam is
PyTorch's. Learning rates, where ``batch_size`` is the global number of images per step (a pair
of views counts once):

- LARS: 0.3 x batch / 256 (Chen et al. 2020), momentum 0.9, trust coefficient 0.001
- LAMB: 4 / (2^(3 - (log2(batch) - 9) / 2) x 100), i.e. 0.005 at batch 512, square-root scaling
- Adam: 1e-4

Weight decay 1e-6. Biases and batch-norm parameters (every 1-D parameter) get neither weight
decay nor the layer-wise trust-ratio adaptation. The schedule is a linear warm-up followed by a
cosine decay to zero, stepped once per optimizer step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal, get_args

import torch
from timm.optim import Lamb, Lars
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "OPTIMIZERS",
    "WarmupCosine",
    "auto_lr",
    "build_optimizer",
    "build_scheduler",
    "param_groups",
]

OptimizerName = Literal["lars", "lamb", "adam"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
DEFAULT_WEIGHT_DECAY = 1e-6


def auto_lr(optimizer: str, batch_size: int) -> float:
    """The paper's learning rate for ``optimizer`` at a global batch of ``batch_size`` images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if optimizer == "lars":
        return 0.3 * batch_size / 256
    if optimizer == "lamb":
        return 4.0 / (2.0 ** (3.0 - (math.log2(batch_size) - 9.0) / 2.0) * 100.0)
    if optimizer == "adam":
        return 1e-4
    raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")


def _is_excluded(name: str, p: torch.Tensor) -> bool:
    """Biases and normalisation parameters: every parameter with fewer than 2 dimensions."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float = DEFAULT_WEIGHT_DECAY
) -> list[dict]:
    """Split parameters into two groups for the optimizer.

    Group 0: weights (conv, linear) with ``weight_decay`` and trust-ratio adaptation
    (``always_adapt=True`` so LARS/LAMB adapt even at zero decay). Group 1: biases and
    batch-norm parameters with no decay and no adaptation. Frozen parameters are skipped.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (no_decay if _is_excluded(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "always_adapt": True, "name": "weights"},
        {"params": no_decay, "weight_decay": 0.0, "always_adapt": False, "name": "bias_bn"},
    ]


def build_optimizer(
    name: str,
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """LARS, LAMB or Adam over :func:`param_groups` of ``named_params`` (``model.named_parameters()``)."""
    if lr <= 0:
        raise ValueError(f"learning rate must be > 0, got {lr}")
    groups = param_groups(named_params, weight_decay)
    if name == "lars":
        return Lars(groups, lr=lr, momentum=momentum, trust_coeff=0.001)
    if name == "lamb":
        return Lamb(groups, lr=lr)
    if name == "adam":
        for g in groups:
            g.pop("always_adapt")
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


class WarmupCosine:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Linear warm-up from 1/warmup_steps to 1 over ``warmup_steps`` steps, then a cosine decay
    from 1 to 0 at ``total_steps``. A plain object (not a lambda) so the scheduler's state_dict
    round-trips through a checkpoint.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, {total_steps}], got {warmup_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> LambdaLR:
    """Per-step :class:`WarmupCosine` schedule; call ``scheduler.step()`` after ``optimizer.step()``."""
    return LambdaLR(optimizer, WarmupCosine(total_steps, warmup_steps))
