"""Pretraining throughput: the real augmentation + loader pipeline vs the in-memory ceiling.

    .venv/bin/python benchmarks/pretrain.py [--patch-px 96] [--batch-size 32] [--steps 10]
        [--precisions fp32,bf16] [--augment-on device,loader] [--threads N] [--device auto]

Patches come from every image source under ``../shared/data`` (the CMU slide's tissue tiles at
0.5 um/px, the LC25000 and NCT-CRC patches, the TCGA tissue tiles, the MoNuSeg images), built
and preloaded exactly as ``python -m engine.pretrain`` does. For each precision setting it
prints training images/s (a pair of views counts as one image) of

- ceiling: ResNet-18 + projection head + NT-Xent + LARS step (``engine.pretrain.train_step``) on
  views already augmented and in memory (a few distinct batches, cycled);
- pipeline "device": the patch set indexed in memory, both views made by ``BatchAugment``
  (batched, per-image parameters) on the training device, then the same step;
- pipeline "loader": ``transforms.v2`` per image in DataLoader workers, then the same step;

and the ratio pipeline / ceiling. Measurements are interleaved in rounds (ceiling, then each
pipeline) so that all of them see the same load on a shared machine. Goal: ratio >= 0.85 with the fastest setting.
bf16 is autocast + channels_last; on CPUs without native bf16 (no AVX512-BF16/AMX) it is
emulated and far slower than fp32, so it runs with fewer steps (``--bf16-rounds``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from engine.augment import AugmentConfig, BatchAugment, TwoViews, build_transform
from engine.distributed import resolve_device
from engine.encode import autocast_dtype, cpu_supports_bf16
from engine.losses import NTXentLoss
from engine.optim import auto_lr, build_optimizer, build_scheduler
from engine.patches import PatchDataset, build_patch_set
from engine.pretrain import (
    SimCLR,
    autocast_context,
    make_loader,
    make_views,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def sources(shared: Path) -> list[Path]:
    """Every unlabeled image source of the shared data (segmentation masks left out)."""
    cands = [
        shared / "slides",
        shared / "patches" / "lc25000-lung-subset",
        shared / "patches" / "nct-crc-he-100k-nonorm-sample9",
        shared / "tissue-tiles",
        shared / "segmentation" / "monuseg-subset" / "images",
    ]
    found = [p for p in cands if p.exists()]
    if not found:
        raise SystemExit(f"error: {shared}: no shared data — run beside ../shared/data")
    return found


class Trainer:
    """Model, head, loss, LARS and schedule for one precision setting."""

    def __init__(self, args: argparse.Namespace, device: torch.device, precision: str) -> None:
        torch.manual_seed(0)
        self.device = device
        dtype = autocast_dtype(precision)  # type: ignore[arg-type]
        self.memory_format = torch.channels_last if dtype else torch.contiguous_format
        self.model = SimCLR("resnet18").to(device, memory_format=self.memory_format)
        self.opt = build_optimizer(
            "lars", self.model.named_parameters(), auto_lr("lars", args.batch_size)
        )
        self.sched = build_scheduler(self.opt, total_steps=10**6, warmup_steps=10)
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)
        self.amp = autocast_context(device, dtype)
        self.criterion = NTXentLoss(0.1)
        self.model.train()

    def step(self, views: torch.Tensor) -> None:
        train_step(self.model, views, self.criterion, self.opt, self.sched, self.scaler, self.amp)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run_step, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds of ``steps`` calls of ``run_step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run_step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run_step()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--patch-px", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (ceiling, each pipeline), interleaved so that all see the same load")  # fmt: skip
    p.add_argument("--bf16-rounds", type=int, default=None,
                   help="rounds for bf16 (default: --rounds, or 1 round of 1 step where bf16 is emulated)")  # fmt: skip
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--augment-on", default="device,loader")
    p.add_argument("--workers", type=int, default=1, help="loader workers for the loader path")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="auto")
    p.add_argument("--shared", type=Path, default=SHARED)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    native_bf16 = device.type == "cuda" or cpu_supports_bf16()

    srcs = sources(args.shared)
    records = build_patch_set(srcs, mpp=0.5, patch_px=args.patch_px, seed=0)
    raw = PatchDataset(records, args.patch_px)
    raw.preload()
    aug_cfg = AugmentConfig(size=args.patch_px)
    paths = args.augment_on.split(",")
    print(
        f"{len(raw)} patches of {args.patch_px} px from {len(srcs)} sources; "
        f"batch {args.batch_size}; device {device}; torch threads {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus; native bf16: {native_bf16}"
    )
    print(f"{'setting':<20}{'path':<8}{'pipeline':>10}{'ceiling':>10}{'ratio':>8}   images/s")
    for precision in args.precisions.split(","):
        rounds, steps = args.rounds, args.steps
        if precision == "bf16" and not native_bf16:
            rounds, steps = args.bf16_rounds or 1, 1
        elif precision == "bf16" and args.bf16_rounds:
            rounds = args.bf16_rounds
        name = "bf16+channels_last" if precision == "bf16" else "fp32"
        trainer = Trainer(args, device, precision)
        augment = BatchAugment(aug_cfg).to(device)
        torch.manual_seed(1)
        sampler = DistributedSampler(raw, num_replicas=1, rank=0, shuffle=True, seed=0)
        # the ceiling cycles through a few distinct batches of views made beforehand (one batch
        # repeated would overfit into denormal gradients and time the CPU's slow path)
        batches = iter(make_loader(raw, sampler, args.batch_size, device, "device", 0))
        fixed = [
            make_views(next(batches), augment, device, trainer.memory_format)
            for _ in range(min(steps, 4))
        ]
        cycle = itertools.cycle(fixed)
        datasets = {
            "device": (raw, 0, augment),
            "loader": (raw.with_transform(TwoViews(build_transform(aug_cfg))), args.workers, None),
        }
        seconds = {"ceiling": 0.0, **{path: 0.0 for path in paths}}
        for _ in range(rounds):
            seconds["ceiling"] += timed(
                lambda trainer=trainer, cycle=cycle: trainer.step(next(cycle)), steps, 1, device
            )
            for path in paths:
                ds, workers, aug = datasets[path]
                loader = make_loader(ds, sampler, args.batch_size, device, path, workers)
                if len(loader) < steps + 1:
                    raise SystemExit(f"error: {len(loader)} batches per epoch < {steps + 1}")
                it = iter(loader)  # a fresh iterator: worker start-up falls in the warm-up step

                def step(it=it, aug=aug, trainer=trainer) -> None:
                    trainer.step(make_views(next(it), aug, device, trainer.memory_format))

                seconds[path] += timed(step, steps, 1, device)
                del it, loader
        images = rounds * steps * args.batch_size
        ceiling = images / seconds["ceiling"]
        for path in paths:
            r = images / seconds[path]
            print(f"{name:<20}{path:<8}{r:>10.2f}{ceiling:>10.2f}{r / ceiling:>8.2f}")
        print(f"{'':<28}{rounds} rounds x {steps} timed steps of each, interleaved")


if __name__ == "__main__":
    main()
