"""``python -m engine.pretrain``: SimCLR pretraining as in Ciga, Xu and Martel (sections 3.1, 4.1).

One process on a CPU or a GPU needs no launcher; ``torchrun --nproc-per-node N -m engine.pretrain``
trains on N processes (DistributedSampler; gloo on CPU, NCCL on CUDA; negatives from the global
batch). Writes into ``--out``:

- ``checkpoint.pt``: backbone, head, optimizer, scheduler, scaler, RNG states, epoch, config;
  written atomically every ``--save-every`` epochs and at the end. ``--resume`` continues from it
  exactly (a run interrupted after 2 of 4 epochs and resumed gives the 4-epoch run's losses).
- ``encoder.pt``: the backbone alone, for ``load_encoder`` / ``engine.extract --encoder``.
- ``metrics.jsonl`` (one line per epoch: epoch, step, loss, lr, images/s), ``loss.png``,
  ``config.json`` (the resolved configuration), ``patches.csv`` (the patches trained on).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from engine.augment import JITTER_PRESETS, AugmentConfig, BatchAugment, TwoViews, build_transform
from engine.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from engine.errors import HistoclusterError
from engine.losses import NTXentLoss
from engine.models import (
    ARCHS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ProjectionHead,
    build_backbone,
    feature_dim,
    save_encoder,
)
from engine.optim import OPTIMIZERS, auto_lr, build_optimizer, build_scheduler
from engine.patches import (
    PatchDataset,
    build_patch_set,
    estimate_bytes,
    read_patch_csv,
    write_patch_csv,
)

__all__ = [
    "PretrainConfig",
    "SimCLR",
    "autocast_context",
    "build_parser",
    "main",
    "make_loader",
    "make_views",
    "parse_config",
    "train",
    "train_step",
]

CHECKPOINT_FORMAT = "histocluster-pretrain"
CHECKPOINT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PRELOAD_LIMIT_BYTES = 2 * 1024**3
# Settings a resumed run must share with its checkpoint (epochs, workers, device... may change).
_RESUME_KEYS = (
    "arch", "batch_size", "optimizer", "lr", "temperature", "augment", "hue", "crop_min",
    "patch_px", "seed", "weight_decay", "warmup_epochs", "proj_hidden", "proj_dim",
)  # fmt: skip


@dataclass
class PretrainConfig:
    """Everything a run depends on; argparse builds it, config.json and checkpoints store it."""

    data: list[str]
    out: str
    arch: str = "resnet18"
    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "lars"
    lr: float | None = None  # None: the paper's rule for the optimizer and batch (auto)
    temperature: float = 0.1
    augment: str = "heavy"
    hue: float | None = None  # None: the --augment preset's hue strength
    crop_min: float = 0.01
    patch_px: int = 224
    mpp: float = 0.5
    max_per_slide: int = 100
    fraction: float | None = None
    precision: str = "auto"
    workers: int | None = None  # None: auto
    device: str = "auto"
    resume: bool = False
    seed: int = 0
    save_every: int = 10
    quiet: bool = False
    slide_mpp: float | None = None
    # not command-line flags: the paper's fixed choices
    weight_decay: float = 1e-6
    warmup_epochs: float | None = None  # None: 10 epochs, at most a tenth of the run
    proj_hidden: int | None = None  # None: the backbone's feature width (SimCLR)
    proj_dim: int = 128
    augment_on: str = "auto"  # "device" (batched, BatchAugment) | "loader" (v2 per image) | auto

    def validate(self) -> None:
        """Raise HistoclusterError with one line naming the flag and the fix."""
        checks = [
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (self.lr is None or self.lr > 0, f"--lr must be > 0 or auto, got {self.lr}"),
            (0 < self.crop_min <= 1, f"--crop-min must be in (0, 1], got {self.crop_min}"),
            (
                self.hue is None or 0 <= self.hue <= 0.5,
                f"--hue must be in [0, 0.5], got {self.hue}",
            ),
            (self.patch_px >= 16, f"--patch-px must be >= 16, got {self.patch_px}"),
            (self.mpp > 0, f"--mpp must be > 0, got {self.mpp}"),
            (self.max_per_slide >= 1, f"--max-per-slide must be >= 1, got {self.max_per_slide}"),
            (
                self.fraction is None or 0 < self.fraction <= 1,
                f"--fraction must be in (0, 1], got {self.fraction}",
            ),
            (self.save_every >= 1, f"--save-every must be >= 1, got {self.save_every}"),
            (
                self.workers is None or self.workers >= 0,
                f"--workers must be >= 0, got {self.workers}",
            ),
            (self.slide_mpp is None or self.slide_mpp > 0, "--slide-mpp must be > 0"),
            (
                self.augment_on in ("auto", "device", "loader"),
                f"bad augment_on {self.augment_on!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise HistoclusterError(f"{msg} — fix the flag")
        if not self.data:
            raise HistoclusterError("no --data given — pass slide or image folders")


def _float_or_auto(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from e


def _int_or_auto(text: str) -> int | None:
    return None if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine.pretrain",
        description="SimCLR pretraining of a ResNet on unlabeled slides and image folders, with the "
        "paper's augmentations, NT-Xent loss and LARS/LAMB/Adam (Ciga, Xu and Martel). "
        "Several processes: torchrun --nproc-per-node N -m engine.pretrain ...",
        epilog="Fixed choices of the paper: weight decay 1e-6 (not on biases and batch-norm), "
        "linear warm-up for 10 epochs (at most a tenth of the run) then cosine decay to 0, "
        "projection head Linear-ReLU-Linear to 128. Outputs in --out: checkpoint.pt, encoder.pt, "
        "metrics.jsonl, loss.png, config.json, patches.csv.",
    )
    a = p.add_argument
    a("--data", nargs="+", required=True, metavar="PATH",
      help="slide or image folders (any depth), single files, or a patches.csv of an earlier run; "
      "each PATH is one dataset for --fraction")  # fmt: skip
    a("--out", required=True, metavar="RUN_DIR", help="output folder")
    a("--arch", default="resnet18", choices=list(ARCHS), help="backbone (default: resnet18)")
    a("--epochs", type=int, default=100, help="epochs to train in total (default: 100)")
    a("--batch-size", type=int, default=256,
      help="global batch in images (a pair of views counts once), split over processes (default: 256)")  # fmt: skip
    a("--optimizer", default="lars", choices=list(OPTIMIZERS), help="optimizer (default: lars)")
    a("--lr", type=_float_or_auto, default=None, metavar="LR|auto",
      help="base learning rate; auto = the paper's: lars 0.3*batch/256, "
      "lamb 4/(2^(3-(log2(batch)-9)/2)*100), adam 1e-4 (default: auto)")  # fmt: skip
    a("--temperature", type=float, default=0.1, help="NT-Xent temperature, > 0 (default: 0.1)")
    a("--augment", default="heavy", choices=[k for k in JITTER_PRESETS if k != "none"],
      help="colour-jitter preset: light (0.4,0.4,0.4,0.2), medium (0.8,0.8,0.8,0.2), "
      "heavy (0.8,0.8,0.8,0.4) for brightness, contrast, saturation, hue (default: heavy)")  # fmt: skip
    a("--hue", type=float, default=None,
      help="hue jitter strength in [0, 0.5] instead of the preset's; small values (0.05) keep the "
      "colour of ink and other artefacts tellable apart (default: the preset's)")  # fmt: skip
    a("--crop-min", type=float, default=0.01,
      help="smallest random-crop area as a fraction of the patch (default: 0.01, the paper's best)")  # fmt: skip
    a("--patch-px", type=int, default=224, help="patch side in pixels (default: 224)")
    a("--mpp", type=float, default=0.5,
      help="micrometres per pixel of the slide tiles (default: 0.5)")  # fmt: skip
    a("--max-per-slide", type=int, default=100,
      help="at most this many random tissue tiles per slide (default: 100, as the paper)")  # fmt: skip
    a("--fraction", type=float, default=None,
      help="keep this fraction of each dataset, at least 10 and at most 2000 images (default: all)")  # fmt: skip
    a("--precision", default="auto", choices=PRECISIONS,
      help="auto: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, else fp32; "
      "fp16 needs CUDA (default: auto)")  # fmt: skip
    a("--workers", type=_int_or_auto, default=None, metavar="N|auto",
      help="DataLoader worker processes per process (default: auto)")  # fmt: skip
    a("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    a("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    a(
        "--seed",
        type=int,
        default=0,
        help="seed of patch sampling, initialisation and batches (default: 0)",
    )
    a("--save-every", type=int, default=10,
      help="write checkpoint.pt and encoder.pt every N epochs, and at the end (default: 10)")  # fmt: skip
    a("--quiet", action="store_true", help="no progress bar or summary")
    a("--slide-mpp", type=float, default=None,
      help="micrometres per pixel of slides whose files lack it (default: read from the file)")  # fmt: skip
    return p


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    ns = build_parser().parse_args(argv)
    return PretrainConfig(**vars(ns))


# --- model ---------------------------------------------------------------------------------------


class SimCLR(nn.Module):
    """Backbone + projection head: (B, 3, H, W) normalised -> (B, proj_dim) projections."""

    def __init__(self, arch: str, proj_hidden: int | None = None, proj_dim: int = 128) -> None:
        super().__init__()
        dim = feature_dim(arch)
        self.backbone = build_backbone(arch)
        self.head = ProjectionHead(dim, proj_hidden or dim, proj_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


# --- resolved settings ---------------------------------------------------------------------------


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively (AVX512-BF16 / AMX); emulated bf16 is far slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, channels_last) for ``precision`` on ``device``."""
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if device.type != "cuda":
            raise HistoclusterError("--precision fp16 needs CUDA — use bf16 or fp32 on CPU")
        return torch.float16, True
    return torch.bfloat16, True


def _warmup_steps(cfg: PretrainConfig, steps_per_epoch: int, total_steps: int) -> int:
    epochs = cfg.warmup_epochs if cfg.warmup_epochs is not None else min(10.0, cfg.epochs / 10)
    return int(min(total_steps, round(epochs * steps_per_epoch)))


# --- checkpoint ----------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_key": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, state["numpy_pos"], 0, 0.0))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint.pt of this module, read with ``weights_only=True``."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HistoclusterError(
            f"{path}: unreadable checkpoint ({type(e).__name__}) — delete it or use another --out"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise HistoclusterError(f"{path}: not a checkpoint of engine.pretrain — use another --out")
    return ckpt


# --- data ----------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63)


class _PreloadedBatches:
    """Batches of uint8 patches indexed straight from the preloaded tensor, kept on ``device``
    (on CUDA the whole patch set sits in GPU memory: no loader work at all)."""

    def __init__(self, ds: PatchDataset, sampler: Any, batch: int, device: torch.device) -> None:
        self.sampler, self.batch = sampler, batch
        self.cache = ds.preloaded.to(device)
        self.device = device

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        idx = torch.tensor(list(self.sampler), dtype=torch.long, device=self.device)
        for i in range(len(self)):
            yield self.cache[idx[i * self.batch : (i + 1) * self.batch]]


def _default_workers(device: torch.device, augment_on: str, preloaded: bool) -> int:
    if augment_on == "device" and preloaded:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_proc = max(1, (cpus or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if device.type == "cpu":
        return min(2, max(0, per_proc - 1))
    return min(8, per_proc)


def make_loader(
    ds: PatchDataset,
    sampler: Any,
    local_batch: int,
    device: torch.device,
    augment_on: str,
    workers: int,
    generator: torch.Generator | None = None,
) -> Any:
    """Batches for one process: uint8 (b, 3, P, P) patches when ``augment_on == "device"``,
    else pairs of augmented float views ((b, 3, S, S), (b, 3, S, S)) from the dataset's transform.
    A preloaded set augmented on the device is indexed in memory without worker processes."""
    from torch.utils.data import DataLoader

    if augment_on == "device" and ds.preloaded is not None and workers == 0:
        return _PreloadedBatches(ds, sampler, local_batch, device)
    return DataLoader(
        ds, batch_size=local_batch, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=False, generator=generator,
    )  # fmt: skip


def make_views(
    batch: Any,
    augment: BatchAugment | None,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """(2b, 3, S, S) float: both views of a loader batch, first views then second views.

    With ``augment`` the batch is uint8 patches, augmented twice on ``device``; without, it is
    the pair of views the loader's transform made."""
    if augment is not None:
        x = batch.to(device, non_blocking=True)
        views = torch.cat([augment(x), augment(x)])
    else:
        views = torch.cat([batch[0], batch[1]]).to(device, non_blocking=True)
    return views.contiguous(memory_format=memory_format)


def train_step(
    model: nn.Module,
    views: torch.Tensor,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    amp: Any,
) -> torch.Tensor:
    """One SimCLR step on ``views`` (2b, 3, S, S): forward both views together (batch-norm sees
    both), NT-Xent in float32, backward, optimizer and schedule step. Returns the detached loss."""
    with amp:
        z = model(views)
    z1, z2 = z.float().chunk(2)
    loss = criterion(z1, z2)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# --- training ------------------------------------------------------------------------------------


def _log(info: DistInfo, cfg: PretrainConfig, msg: str) -> None:
    if info.is_main and not cfg.quiet:
        print(msg, file=sys.stderr, flush=True)


def _plot_loss(history: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("NT-Xent loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def train(cfg: PretrainConfig, *, stop_after_epoch: int | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; returns a summary. ``stop_after_epoch`` ends the run early,
    checkpointed, as an interruption would (for tests of ``--resume``)."""
    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, stop_after_epoch)
    finally:
        cleanup()


def _train(cfg: PretrainConfig, info: DistInfo, stop_after_epoch: int | None) -> dict[str, Any]:
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    dev = info.device
    ckpt: dict[str, Any] | None = None
    if ckpt_path.exists():
        if not cfg.resume:
            raise HistoclusterError(
                f"{ckpt_path}: a run is already there — pass --resume to continue it or choose a new --out"
            )
        ckpt = load_checkpoint(ckpt_path)
        _check_resume(ckpt["config"], cfg, ckpt_path)
    elif cfg.resume:
        _log(info, cfg, f"note: {ckpt_path} does not exist yet; starting a new run")

    if cfg.batch_size % info.world_size:
        raise HistoclusterError(
            f"--batch-size {cfg.batch_size} does not split over {info.world_size} processes — "
            f"use a multiple of {info.world_size}"
        )
    local_batch = cfg.batch_size // info.world_size

    # patches: sampled once per run; a resumed run reads the set it started with
    patches_csv = out / "patches.csv"
    if ckpt is not None and patches_csv.exists():
        records = read_patch_csv(patches_csv)
    else:
        records = build_patch_set(
            cfg.data, mpp=cfg.mpp, patch_px=cfg.patch_px, max_per_slide=cfg.max_per_slide,
            fraction=cfg.fraction, seed=cfg.seed, slide_mpp=cfg.slide_mpp,
            log=(lambda m: _log(info, cfg, m)),
        )  # fmt: skip
    if len(records) < cfg.batch_size:
        raise HistoclusterError(
            f"{cfg.data[0]}: --batch-size {cfg.batch_size} is larger than the dataset "
            f"({len(records)} patches) — lower --batch-size or add data"
        )

    autocast_dtype, channels_last = resolve_precision(cfg.precision, dev)
    augment_on = cfg.augment_on
    if augment_on == "auto":
        augment_on = "device"  # batched: fastest on CUDA, and on CPU (see benchmarks/pretrain.py)
    aug_cfg = AugmentConfig(
        size=cfg.patch_px, crop_min=cfg.crop_min, jitter=cfg.augment, hue=cfg.hue,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
    )  # fmt: skip
    ds = PatchDataset(
        records, cfg.patch_px,
        transform=None if augment_on == "device" else TwoViews(build_transform(aug_cfg)),
    )  # fmt: skip
    preload = estimate_bytes(len(records), cfg.patch_px) <= PRELOAD_LIMIT_BYTES
    if preload:
        for msg in ds.preload(progress=info.is_main and not cfg.quiet and sys.stderr.isatty()):
            _log(info, cfg, f"warning: {msg}")
        if len(ds) < cfg.batch_size:
            raise HistoclusterError(
                f"{cfg.data[0]}: --batch-size {cfg.batch_size} is larger than the readable dataset "
                f"({len(ds)} patches) — lower --batch-size or add data"
            )
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_patch_csv(ds.records, patches_csv)

    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(
        ds, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
        drop_last=True,
    )  # fmt: skip
    workers = cfg.workers if cfg.workers is not None else _default_workers(dev, augment_on, preload)
    loader_gen = torch.Generator()
    loader = make_loader(ds, sampler, local_batch, dev, augment_on, workers, loader_gen)
    steps_per_epoch = len(loader)
    if steps_per_epoch < 1:
        raise HistoclusterError(
            f"{cfg.data[0]}: --batch-size {cfg.batch_size} leaves no full batch per process "
            f"({len(ds)} patches over {info.world_size} processes) — lower --batch-size or add data"
        )

    # model, optimizer, schedule
    torch.manual_seed(cfg.seed)
    model = SimCLR(cfg.arch, cfg.proj_hidden, cfg.proj_dim)
    if ckpt is not None:
        model.backbone.load_state_dict(ckpt["model"])
        model.head.load_state_dict(ckpt["head"])
    if info.distributed and dev.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    lr = cfg.lr if cfg.lr is not None else auto_lr(cfg.optimizer, cfg.batch_size)
    optimizer = build_optimizer(cfg.optimizer, model.named_parameters(), lr, cfg.weight_decay)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = _warmup_steps(cfg, steps_per_epoch, total_steps)
    scheduler = build_scheduler(optimizer, total_steps, warmup)
    scaler = torch.amp.GradScaler("cuda", enabled=autocast_dtype == torch.float16)
    start_epoch, step = 0, 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        sched_fn = scheduler.lr_lambdas[0]
        if (sched_fn.total_steps, sched_fn.warmup_steps) != (total_steps, warmup):
            _log(
                info,
                cfg,
                f"note: --epochs changed to {cfg.epochs}; the cosine schedule is stretched",
            )
            sched_fn.total_steps, sched_fn.warmup_steps = total_steps, warmup
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        _set_rng_state(ckpt["rng"])
    ddp_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[dev] if dev.type == "cuda" else None)
    criterion = NTXentLoss(cfg.temperature)
    augment = BatchAugment(aug_cfg).to(dev)

    resolved = {
        **asdict(cfg), "lr_resolved": lr, "world_size": info.world_size, "device": str(dev),
        "autocast": str(autocast_dtype).replace("torch.", "") if autocast_dtype else "fp32",
        "channels_last": channels_last, "local_batch": local_batch, "workers": workers,
        "augment_on": augment_on, "preloaded": preload, "n_patches": len(ds),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
        "torch": torch.__version__,
    }  # fmt: skip
    metrics_path = out / "metrics.jsonl"
    history = _read_metrics(metrics_path, start_epoch) if info.is_main else []
    if info.is_main:
        (out / "config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    _log(
        info, cfg,
        f"pretrain: {len(ds)} patches, {cfg.arch}, batch {cfg.batch_size} ({info.world_size} x "
        f"{local_batch}), {cfg.optimizer} lr {lr:.4g}, {resolved['autocast']}"
        f"{' + channels_last' if channels_last else ''} on {dev}, epochs {start_epoch}->{cfg.epochs}",
    )  # fmt: skip

    from tqdm import tqdm

    show = info.is_main and not cfg.quiet and sys.stderr.isatty()
    end_epoch = cfg.epochs if stop_after_epoch is None else min(cfg.epochs, stop_after_epoch)
    mem_fmt = torch.channels_last if channels_last else torch.contiguous_format
    amp = autocast_context(dev, autocast_dtype)

    def save(epoch: int) -> None:
        if not info.is_main:
            return
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": model.backbone.state_dict(), "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": _rng_state(), "epoch": epoch, "step": step,
                "config": json.loads(json.dumps(asdict(cfg), default=str)),
            },
            ckpt_path,
        )  # fmt: skip
        save_encoder(
            out / "encoder.pt", model.backbone, cfg.arch, IMAGENET_MEAN, IMAGENET_STD,
            cfg.patch_px, resolved,
        )  # fmt: skip
        if history:
            _plot_loss(history, out / "loss.png")

    ddp_model.train()
    for epoch in range(start_epoch, end_epoch):
        sampler.set_epoch(epoch)
        seed = _epoch_seed(cfg.seed, epoch, info.rank)
        torch.manual_seed(seed)  # augmentation draws of this epoch (device path, workers=0)
        loader_gen.manual_seed(seed)  # worker seeds of this epoch (loader path)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show)
        loss_sum = torch.zeros((), device=dev)
        t0 = time.perf_counter()
        for batch in loader:
            views = make_views(batch, augment if augment_on == "device" else None, dev, mem_fmt)
            loss = train_step(ddp_model, views, criterion, optimizer, scheduler, scaler, amp)
            step += 1
            loss_sum += loss.detach()
            if show:
                rate = (bar.n + 1) * cfg.batch_size / (time.perf_counter() - t0)
                bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - t0
        mean_loss = float(all_reduce_mean(loss_sum / steps_per_epoch).item())
        if not math.isfinite(mean_loss):
            raise HistoclusterError(
                f"{out}: the loss became {mean_loss} in epoch {epoch + 1} — lower --lr or use --precision fp32"
            )
        row = {
            "epoch": epoch + 1, "step": step, "loss": mean_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": steps_per_epoch * cfg.batch_size / seconds,
        }  # fmt: skip
        if info.is_main:
            history.append(row)
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        _log(
            info, cfg,
            f"epoch {epoch + 1}/{cfg.epochs}: loss {mean_loss:.4f}, lr {row['lr']:.4g}, "
            f"{row['images_per_s']:.1f} images/s",
        )  # fmt: skip
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == end_epoch:
            save(epoch + 1)
        barrier()
    if start_epoch >= end_epoch:
        save(start_epoch)  # nothing left to train: refresh encoder.pt and loss.png
    barrier()
    return {"epochs": end_epoch, "step": step, "history": history, "config": resolved}


def _check_resume(saved: dict[str, Any], cfg: PretrainConfig, path: Path) -> None:
    now = json.loads(json.dumps(asdict(cfg), default=str))
    for key in _RESUME_KEYS:
        if saved.get(key) != now.get(key):
            flag = "--" + key.replace("_", "-")
            raise HistoclusterError(
                f"{path}: was trained with {flag} {saved.get(key)}, not {now.get(key)} — "
                f"rerun with the same settings or choose a new --out"
            )


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 on success, 1 with a one-line ``error: ...`` on stderr."""
    cfg = parse_config(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    try:
        summary = train(cfg)
    except HistoclusterError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if rank == 0:
            print(f"error: {cfg.out}: interrupted — continue with --resume", file=sys.stderr)
        return 130
    if rank == 0 and not cfg.quiet:
        last = summary["history"][-1] if summary["history"] else None
        tail = f", final loss {last['loss']:.4f}" if last else ""
        print(f"{cfg.out}: trained {summary['epochs']} epochs ({summary['step']} steps){tail}")
        print(f"wrote {Path(cfg.out) / 'encoder.pt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
