"""The torchrun environment: process group set-up, rank-0 helpers, all-gather with gradients.

With no launcher (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``) everything here is a
no-op and the program runs as one process. Under ``torchrun --nproc-per-node N`` the process group
is created from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from engine.launcher_env import env_int

__all__ = [
    "DistInfo",
    "all_gather_with_grad",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "init_distributed",
    "is_distributed",
    "resolve_device",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    ``device`` is the device this process computes on (``cuda:<local_rank>`` or ``cpu``);
    ``is_main`` is true on global rank 0, the process that writes files and prints.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

    ``"cuda"`` without an index also picks ``cuda:<local_rank>``; anything else is taken as is.
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Read torchrun's environment and create the process group when there are several processes.

    Returns a :class:`DistInfo`. Safe to call twice: an existing process group is reused.
    """
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(
        rank=rank, world_size=world_size, local_rank=local_rank, device=dev, is_main=rank == 0
    )


def is_distributed() -> bool:
    """True when a process group with more than one member is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` (B, ...) from every rank in rank order -> (world_size * B, ...).

    Gradients flow back: each rank receives the sum over ranks of the gradients that reached its
    slice. Every rank must pass the same shape. Without a process group, returns ``t`` unchanged.
    """
    if not is_distributed():
        return t
    return torch.cat(dist_fn.all_gather(t), dim=0)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (no gradient); ``t`` itself when single-process."""
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
