"""engine.distributed: single-process defaults and a real 2-process gloo group."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine import distributed as D


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_without_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = D.init_distributed(device="cpu")
    assert info == D.DistInfo(0, 1, 0, torch.device("cpu"), True)
    assert not info.distributed
    assert not D.is_distributed()
    t = torch.randn(3, 4, requires_grad=True)
    assert D.all_gather_with_grad(t) is t
    D.barrier()
    D.cleanup()


def test_resolve_device():
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("cuda", local_rank=3) == torch.device("cuda", 3)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert D.resolve_device("auto").type == expected


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_distributed(device="cpu")


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    info = D.init_distributed(device="cpu")
    try:
        assert info.rank == rank and info.world_size == world_size
        assert info.is_main == (rank == 0) and info.distributed
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        g = D.all_gather_with_grad(x)
        # each rank weights the gathered rows by (its rank + 1) * row index
        w = torch.arange(g.shape[0], dtype=torch.float32)[:, None] * (rank + 1)
        (g * w).sum().backward()
        mean = D.all_reduce_mean(torch.tensor([float(rank)]))
        D.barrier()
        torch.save({"gathered": g.detach(), "grad": x.grad, "mean": mean}, f"{out_dir}/{rank}.pt")
    finally:
        D.cleanup()


def test_two_gloo_processes_gather_with_grad(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        r = torch.load(tmp_path / f"{rank}.pt")
        expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
        assert torch.equal(r["gathered"], expected)
        # d/dx of sum_r (r+1) * sum_i i * g_i over this rank's rows i = 2*rank, 2*rank+1
        rows = torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32)[:, None]
        assert torch.allclose(r["grad"], (1 + 2) * rows.expand(2, 3))
        assert r["mean"].item() == pytest.approx(0.5)
