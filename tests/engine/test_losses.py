"""engine.losses: NT-Xent against a naive per-pair reference, a closed form, and 2 gloo ranks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.losses import NTXentLoss, nt_xent

torch.set_num_threads(1)


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Paper eq. 1 pair by pair: z = [z1; z2], positive of k is k +- n, mean over all 2n rows."""
    z = torch.cat([z1, z2]).double()
    n2 = z.shape[0]
    n = n2 // 2

    def sim(u, v):
        return torch.dot(u, v) / (u.norm() * v.norm())

    total = torch.zeros((), dtype=torch.float64)
    for i in range(n2):
        j = (i + n) % n2
        num = torch.exp(sim(z[i], z[j]) / tau)
        den = sum(torch.exp(sim(z[i], z[k]) / tau) for k in range(n2) if k != i)
        total = total - torch.log(num / den)
    return total / n2


@pytest.mark.parametrize("n,d", [(1, 3), (2, 5), (7, 16)])
@pytest.mark.parametrize("tau", [0.05, 0.1, 0.5, 2.0])
def test_matches_naive_reference(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1 = torch.randn(n, d, generator=g) * 3
    z2 = torch.randn(n, d, generator=g)
    got = nt_xent(z1, z2, tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(naive_nt_xent(z1, z2, tau).item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 8, 33])
def test_closed_form_for_identical_embeddings(n):
    # every similarity is 1: each row has 2n - 1 equal terms, loss = log(2n - 1) for any tau
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).repeat(n, 1)
    for tau in (0.1, 1.0):
        assert nt_xent(z, z.clone(), tau).item() == pytest.approx(math.log(2 * n - 1), abs=1e-6)


def test_perfect_separation_goes_to_zero():
    # orthogonal images, identical views: the loss vanishes as tau shrinks
    z = torch.eye(4)
    assert nt_xent(z, z, 0.01).item() < 1e-6
    assert nt_xent(z, z, 1.0).item() > 0.5


def test_module_scale_invariance_and_grad():
    z1 = torch.randn(5, 8, requires_grad=True)
    z2 = torch.randn(5, 8)
    loss = NTXentLoss(temperature=0.1)
    base = loss(z1, z2)
    assert loss(z1 * 7, z2 * 0.3).item() == pytest.approx(base.item(), rel=1e-5)
    base.backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_bf16_inputs_computed_in_float32():
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    ref = nt_xent(z1, z2)
    got = nt_xent(z1.bfloat16(), z2.bfloat16())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)


@pytest.mark.parametrize("tau", [0.0, -0.1, float("inf"), float("nan")])
def test_rejects_non_positive_or_non_finite_temperature(tau):
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(tau)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(torch.ones(2, 2), torch.ones(2, 2), tau)


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="z1 and z2"):
        nt_xent(torch.ones(2, 3), torch.ones(3, 3))


# --- two gloo processes, half the batch each == one process, full batch -------------------------

N, D_IN, D_OUT, WORLD = 6, 5, 4, 2


def _data():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(N, D_IN, generator=g), torch.randn(N, D_IN, generator=g)
    torch.manual_seed(1)
    proj = torch.nn.Linear(D_IN, D_OUT)
    return x1, x2, proj


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from engine import distributed as D

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    D.init_distributed(device="cpu")
    try:
        x1, x2, proj = _data()
        half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        z1 = proj(x1[half])
        z2 = proj(x2[half]).detach().requires_grad_(True)
        loss = nt_xent(z1, z2, 0.1)
        loss.backward()
        # DDP's rule: average parameter gradients and losses over ranks
        for p in proj.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        mean_loss = D.all_reduce_mean(loss.detach())
        torch.save(
            {"loss": mean_loss, "w": proj.weight.grad, "b": proj.bias.grad, "z2": z2.grad},
            f"{out_dir}/{rank}.pt",
        )
    finally:
        D.cleanup()


def test_two_gloo_ranks_equal_one_process_full_batch(tmp_path):
    x1, x2, proj = _data()
    z2 = proj(x2).detach().requires_grad_(True)
    full = nt_xent(proj(x1), z2, 0.1)
    full.backward()
    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"{rank}.pt")
        assert r["loss"].item() == pytest.approx(full.item(), rel=1e-6)
        assert torch.allclose(r["w"], proj.weight.grad, atol=1e-6)
        assert torch.allclose(r["b"], proj.bias.grad, atol=1e-6)
        # embedding grads: each rank holds the sum over ranks' losses -> WORLD x the full-batch mean
        half = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        assert torch.allclose(r["z2"] / WORLD, z2.grad[half], atol=1e-6)
    # the local-only loss would differ: the gather is what makes the ranks agree
    assert nt_xent(proj(x1[:3]), proj(x2[:3]), 0.1).item() != pytest.approx(full.item(), rel=1e-3)
