"""engine.optim: the paper's learning rates, bias/BN exclusion, and the warm-up + cosine shape."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from engine.optim import (
    WarmupCosine,
    auto_lr,
    build_optimizer,
    build_scheduler,
    param_groups,
)

torch.set_num_threads(1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 2),
    )  # fmt: skip


@pytest.mark.parametrize(
    "opt,batch,expected",
    [
        ("lars", 256, 0.3),
        ("lars", 512, 0.6),
        ("lars", 128, 0.15),
        ("lamb", 512, 0.005),  # 4 / (2^3 * 100)
        ("lamb", 2048, 0.01),  # 4 / (2^2 * 100)
        ("lamb", 128, 0.0025),  # 4 / (2^4 * 100)
        ("adam", 256, 1e-4),
        ("adam", 64, 1e-4),
    ],
)
def test_paper_learning_rates(opt, batch, expected):
    assert auto_lr(opt, batch) == pytest.approx(expected)


def test_lamb_lr_scales_with_sqrt_batch():
    assert auto_lr("lamb", 1024) / auto_lr("lamb", 256) == pytest.approx(2.0)


def test_unknown_optimizer_and_bad_batch():
    with pytest.raises(ValueError, match="sgd"):
        auto_lr("sgd", 256)
    with pytest.raises(ValueError, match="batch_size"):
        auto_lr("lars", 0)
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer("sgd", _net().named_parameters(), lr=0.1)


def test_param_groups_exclude_bias_and_batchnorm():
    net = _net()
    decay, no_decay = param_groups(net.named_parameters(), weight_decay=1e-6)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "4.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["1.bias", "1.weight", "4.bias"]
    assert decay["weight_decay"] == 1e-6 and decay["always_adapt"]
    assert no_decay["weight_decay"] == 0.0 and not no_decay["always_adapt"]


def test_frozen_parameters_are_skipped():
    net = _net()
    net[0].weight.requires_grad_(False)
    decay, _ = param_groups(net.named_parameters())
    assert len(decay["params"]) == 1


def _one_step(name: str, lr: float, wd: float):
    net = _net()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = build_optimizer(name, net.named_parameters(), lr=lr, weight_decay=wd)
    net(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    after = {n: p.detach().clone() for n, p in net.named_parameters()}
    return before, grads, after


def test_lars_adapts_weights_but_not_bias_or_bn():
    lr, wd, eta = 0.5, 1e-3, 0.001
    before, grads, after = _one_step("lars", lr, wd)
    # bias / BN: plain SGD (first momentum step = the gradient), no decay, no trust ratio
    for n in ("1.weight", "1.bias", "4.bias"):
        assert torch.allclose(after[n], before[n] - lr * grads[n], atol=1e-7), n
    # weights: lr * trust * (g + wd * w), trust = eta * |w| / (|g| + wd * |w|)
    for n in ("0.weight", "4.weight"):
        w, g = before[n], grads[n]
        trust = eta * w.norm() / (g.norm() + wd * w.norm())
        assert torch.allclose(after[n], w - lr * trust * (g + wd * w), atol=1e-7), n
        # a plain SGD step would move far more: the adaptation is really applied
        assert not torch.allclose(after[n], w - lr * g, atol=1e-4)


def test_lamb_adapts_weights_but_not_bias_or_bn():
    lr = 0.01
    before, grads, after = _one_step("lamb", lr, 0.0)
    # first Adam step (bias-corrected) is lr * sign(g) up to eps; unadapted for 1-D params
    for n in ("1.bias", "4.bias"):
        step = before[n] - after[n]
        nz = grads[n].abs() > 1e-3
        assert torch.allclose(step[nz], lr * grads[n][nz].sign(), rtol=1e-2), n
    # weights: the step is rescaled so that |step| = lr * |w| (trust ratio |w| / |update|)
    for n in ("0.weight", "4.weight"):
        step = before[n] - after[n]
        assert step.norm().item() == pytest.approx(lr * before[n].norm().item(), rel=1e-4), n


def test_adam_builds_with_decay_groups():
    opt = build_optimizer("adam", _net().named_parameters(), lr=1e-4)
    assert isinstance(opt, torch.optim.Adam)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-6, 0.0]


def test_warmup_then_cosine_shape():
    f = WarmupCosine(total_steps=110, warmup_steps=10)
    vals = [f(s) for s in range(110)]
    assert vals[0] == pytest.approx(0.1)
    assert vals[9] == pytest.approx(1.0)  # warm-up reaches the base lr
    assert all(b > a for a, b in zip(vals[:9], vals[1:10], strict=True))  # linear rise
    assert all(
        b < a for a, b in zip(vals[10:-1], vals[11:], strict=True)
    )  # strictly decaying after
    assert vals[60] == pytest.approx(0.5)  # half-way through the cosine
    assert vals[109] == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)))
    assert f(110) == pytest.approx(0.0)
    assert WarmupCosine(5, 0)(0) == 1.0


def test_bad_schedule_arguments():
    with pytest.raises(ValueError):
        WarmupCosine(0)
    with pytest.raises(ValueError):
        WarmupCosine(10, 11)


def test_scheduler_drives_lr_and_round_trips_state():
    net = _net()
    opt = build_optimizer("lars", net.named_parameters(), lr=0.3)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.075, 0.075])
    for _ in range(6):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer("lars", _net().named_parameters(), lr=0.3)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=4)
    sched2.load_state_dict(state)
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr()[0] == pytest.approx(0.3 * WarmupCosine(20, 4)(7))
