"""``python -m engine.pretrain``: SimCLR pretraining as in Ciga, Xu and Martel (sections 3.1, 4.1).

One process on a CPU or a GPU needs no launcher; ``torchrun --nproc-per-node N -m engine.pretrain``
trains on N processes (DistributedSampler; gloo on CPU, NCCL on CUDA; negatives from the global
batch; only rank 0 prints and writes). The library entry is ``run(PretrainConfig, progress=...)``.
Writes into ``--out``:

- ``checkpoint.pt``: backbone, head, optimizer, scheduler, scaler, RNG states, epoch, step, config
  and a sha256 of all of it (verified by ``--resume``: altered weights are refused, not trained
  on); written atomically every ``--save-every`` epochs, at the end, and when a progress callback
  cancels the run (then mid-epoch, with the steps of the epoch already done). ``--resume``
  continues from it exactly (a run stopped after 2 of 4 epochs, or mid-epoch, and resumed gives
  the 4-epoch run's losses).
- ``encoder.pt``: the backbone alone, for ``load_encoder`` / ``engine.extract --encoder``.
- ``metrics.jsonl`` (one line per epoch: epoch, step, loss, lr, images/s), ``loss.png``,
  ``config.json`` (the configuration and, under ``resolved``, what auto settings became),
  ``patches.csv`` (the patches trained on).

Progress stages: ``patches`` (slides sampled), ``preload`` (patches decoded), ``train`` (steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from engine import cli
from engine.augment import JITTER_PRESETS, AugmentConfig, BatchAugment, TwoViews, build_transform
from engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    cleanup,
    init_distributed,
    resolve_device,
)
from engine.encode import PRECISIONS, Precision, autocast_dtype, resolve_precision
from engine.errors import HistoclusterError, one_line
from engine.files import atomic_write, atomic_write_text
from engine.launcher_env import env_int
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
from engine.progress import Cancelled, Progress, no_progress

__all__ = [
    "PretrainConfig",
    "PretrainResult",
    "SimCLR",
    "autocast_context",
    "load_checkpoint",
    "main",
    "make_loader",
    "make_views",
    "run",
    "save_checkpoint",
    "state_sha256",
    "train_step",
]

CHECKPOINT_FORMAT = "histocluster-pretrain"
CHECKPOINT_VERSION = 2  # 2: sha256 of the state, mid-epoch position (epoch_step ...)
PRELOAD_LIMIT_BYTES = 2 * 1024**3
# Settings a resumed run must share with its checkpoint (epochs, workers, device... may change).
_RESUME_KEYS = (
    "arch", "batch_size", "optimizer", "lr", "temperature", "augment", "hue", "crop_min",
    "patch_px", "seed", "weight_decay", "warmup_epochs", "proj_hidden", "proj_dim",
)  # fmt: skip


def _or_auto(convert: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``"auto"`` -> None, anything else through ``convert``."""

    def parse(text: str) -> Any:
        if text == "auto":
            return None
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {what} or 'auto', got {text!r}") from e

    return parse


_float_or_auto = _or_auto(float, "a number")
_int_or_auto = _or_auto(int, "an integer")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a run depends on; the flags are generated from it, config.json and checkpoints store it."""

    data: tuple[str, ...] = cli.option(
        metavar="PATH",
        help="slide or image folders (any depth), single files, or a patches.csv of an earlier "
        "run; each PATH is one dataset for --fraction",
    )
    out: str = cli.option(metavar="RUN_DIR", help="output folder")
    arch: str = cli.option("resnet18", choices=list(ARCHS), help="backbone")
    epochs: int = cli.option(100, help="epochs to train in total")
    batch_size: int = cli.option(
        256, help="global batch in images (a pair of views counts once), split over processes"
    )
    optimizer: str = cli.option("lars", choices=OPTIMIZERS, help="optimizer")
    lr: float | None = cli.option(
        None,
        parse=_float_or_auto,
        metavar="LR|auto",
        help="base learning rate; auto = the paper's: lars 0.3*batch/256, "
        "lamb 4/(2^(3-(log2(batch)-9)/2)*100), adam 1e-4 (default: auto)",
    )
    temperature: float = cli.option(0.1, help="NT-Xent temperature, > 0")
    augment: str = cli.option(
        "heavy",
        choices=[k for k in JITTER_PRESETS if k != "none"],
        help="colour-jitter preset: light (0.4,0.4,0.4,0.2), medium (0.8,0.8,0.8,0.2), "
        "heavy (0.8,0.8,0.8,0.4) for brightness, contrast, saturation, hue",
    )
    hue: float | None = cli.option(
        None,
        help="hue jitter strength in [0, 0.5] instead of the preset's; small values (0.05) keep "
        "the colour of ink and other artefacts tellable apart (default: the preset's)",
    )
    crop_min: float = cli.option(
        0.01,
        show_default=False,
        help="smallest random-crop area as a fraction of the patch (default: 0.01, the paper's best)",
    )
    patch_px: int = cli.option(224, help="patch side in pixels")
    mpp: float = cli.option(0.5, help="micrometres per pixel of the slide tiles")
    max_per_slide: int = cli.option(
        100,
        show_default=False,
        help="at most this many random tissue tiles per slide (default: 100, as the paper)",
    )
    fraction: float | None = cli.option(
        None,
        help="keep this fraction of each dataset, at least 10 and at most 2000 images "
        "(default: all)",
    )
    precision: str = cli.option(
        "auto",
        choices=PRECISIONS,
        help="auto: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, else "
        "fp32; fp16 needs CUDA",
    )
    workers: int | None = cli.option(
        None,
        parse=_int_or_auto,
        metavar="N|auto",
        help="DataLoader worker processes per process (default: auto)",
    )
    device: str = cli.option("auto", help="auto, cpu, cuda or cuda:N")
    resume: bool = cli.option(False, help="continue from RUN_DIR/checkpoint.pt")
    seed: int = cli.option(0, help="seed of patch sampling, initialisation and batches")
    save_every: int = cli.option(
        10, help="write checkpoint.pt and encoder.pt every N epochs, and at the end"
    )
    quiet: bool = cli.option(False, help="no progress bar or summary")
    slide_mpp: float | None = cli.option(
        None,
        help="micrometres per pixel of slides whose files lack it (default: read from the file)",
    )
    # not command-line flags: the paper's fixed choices
    weight_decay: float = cli.option(1e-6, cli=False, help="weight decay (not on biases, BN)")
    warmup_epochs: float | None = cli.option(
        None, cli=False, help="linear warm-up epochs (None: 10, at most a tenth of the run)"
    )
    proj_hidden: int | None = cli.option(
        None, cli=False, help="projection head's hidden width (None: the backbone's width)"
    )
    proj_dim: int = cli.option(128, cli=False, help="projection width")
    augment_on: str = cli.option(
        "auto",
        cli=False,
        choices=("auto", "device", "loader"),
        help="device: batched BatchAugment; loader: transforms.v2 per image; auto: device",
    )

    def validate(self) -> None:
        """Raise HistoclusterError with one line naming the flag and the fix."""

        def finite(x: float | None) -> bool:
            return x is None or math.isfinite(x)

        checks = [
            (
                finite(self.temperature) and self.temperature > 0,
                f"--temperature must be > 0 and finite, got {self.temperature}",
            ),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (
                self.lr is None or (finite(self.lr) and self.lr > 0),
                f"--lr must be > 0 and finite, or auto, got {self.lr}",
            ),
            (0 < self.crop_min <= 1, f"--crop-min must be in (0, 1], got {self.crop_min}"),
            (
                self.hue is None or 0 <= self.hue <= 0.5,
                f"--hue must be in [0, 0.5], got {self.hue}",
            ),
            (self.patch_px >= 16, f"--patch-px must be >= 16, got {self.patch_px}"),
            (finite(self.mpp) and self.mpp > 0, f"--mpp must be > 0, got {self.mpp}"),
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
            (
                self.slide_mpp is None or (finite(self.slide_mpp) and self.slide_mpp > 0),
                f"--slide-mpp must be > 0, got {self.slide_mpp}",
            ),
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


@dataclass(frozen=True)
class PretrainResult:
    """What a finished run did: epochs trained in total, optimizer steps, per-epoch metrics."""

    out: Path
    epochs: int
    step: int
    history: tuple[dict[str, Any], ...]
    config: dict[str, Any]  # the resolved settings (config.json's "resolved")
    encoder: Path
    warnings: tuple[str, ...] = field(default=())  # e.g. unreadable images left out


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


def _device(cfg: PretrainConfig) -> torch.device:
    """The ``--device`` this process would use, or a one-line error when it does not exist here."""
    try:
        dev = resolve_device(cfg.device, env_int("LOCAL_RANK", 0))
    except (RuntimeError, ValueError) as e:
        raise HistoclusterError(
            f"--device {cfg.device}: not a device ({one_line(e)}) — use auto, cpu, cuda or cuda:N"
        ) from e
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise HistoclusterError(
            f"--device {cfg.device}: no such CUDA device here — use --device cpu or auto"
        )
    return dev


def _precision(cfg: PretrainConfig, dev: torch.device) -> Precision:
    precision = resolve_precision(cfg.precision, dev)
    if precision == "fp16" and dev.type != "cuda":
        raise HistoclusterError("--precision fp16 needs CUDA — use bf16 or fp32 on CPU")
    return precision


def _memory_bytes(dev: torch.device) -> int | None:
    """The memory of ``dev``: a GPU's total, or the RAM (capped by a cgroup limit); None if unknown."""
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return int(total)


def _check_memory(cfg: PretrainConfig, local_batch: int, dev: torch.device) -> None:
    """Refuse a patch size whose batch of views alone cannot fit in memory (before any worker starts).

    The bound is low on purpose (the float views of one batch and its uint8 patches, no
    activations), so it refuses only settings that cannot run, not settings that might.
    """
    memory = _memory_bytes(dev)
    pixels = 3 * cfg.patch_px * cfg.patch_px
    needed = local_batch * pixels * (2 * 4 + 1)
    if memory is not None and needed > memory:
        raise HistoclusterError(
            f"--patch-px {cfg.patch_px}: one batch of {local_batch} patches needs at least "
            f"{needed / 2**30:,.0f} GiB, more than the {memory / 2**30:,.0f} GiB of {dev} — "
            "use a smaller --patch-px (the paper uses 224) or a smaller --batch-size"
        )


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


def _digest(obj: Any, h: Any) -> None:
    """Feed ``obj`` (nested dicts / lists / tensors / scalars) to ``h`` in a canonical order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            text = repr(key).encode()
            h.update(f"{len(text)}:".encode() + text)
            _digest(obj[key], h)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)};".encode())
        for v in obj:
            _digest(v, h)
    else:
        text = repr(obj).encode()
        h.update(f"V{len(text)}:".encode() + text)


def state_sha256(state: Mapping[str, Any]) -> str:
    """Hex sha256 of a checkpoint's contents (every key but ``sha256``): tensors by dtype, shape
    and bytes, other values by ``repr``; equal before ``torch.save`` and after ``torch.load``."""
    h = hashlib.sha256()
    _digest({k: v for k, v in state.items() if k != "sha256"}, h)
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``state`` plus its :func:`state_sha256`, written atomically to ``path``."""
    payload = {**state, "sha256": state_sha256(state)}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint.pt of this module, read with ``weights_only=True`` and checked against its sha256.

    Raises ``HistoclusterError`` (one line) when the file is unreadable, not a checkpoint of
    this module, or its contents differ from the checksum written with them.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise HistoclusterError(
            f"{path}: unreadable checkpoint ({type(e).__name__}) — the file is damaged; "
            "restore it from a copy, or delete it (or use another --out) to start over"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise HistoclusterError(f"{path}: not a checkpoint of engine.pretrain — use another --out")
    stored = ckpt.get("sha256")
    if ckpt.get("version", 1) >= 2 or stored is not None:
        try:
            actual = state_sha256(ckpt)
        except Exception as e:  # a damaged value that cannot even be hashed
            actual = f"unhashable ({type(e).__name__})"
        if stored != actual:
            raise HistoclusterError(
                f"{path}: its contents do not match the checksum written with them (the file was "
                "altered or damaged) — restore it from a copy, or delete it to start over"
            )
    return ckpt


# --- data ----------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + rank * 104_729) % (2**63)


class _EpochOrder(Sampler[int]):
    """This process's sample order of one epoch (from a DistributedSampler), from a batch on."""

    def __init__(self, sampler: Any, batch: int) -> None:
        self.sampler, self.batch = sampler, batch
        self.indices: list[int] = []

    def set(self, epoch: int, skip_batches: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.indices = list(self.sampler)[skip_batches * self.batch :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


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
    per_proc = max(1, (cpus or 1) // max(1, env_int("LOCAL_WORLD_SIZE", 1)))
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


def _next_batch(batches: Iterator[Any], cfg: PretrainConfig) -> Any:
    """The next batch; a loader worker that died (the kernel's OOM killer, mostly) -> one line."""
    try:
        return next(batches)
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        raise HistoclusterError(
            f"a data loader worker died ({one_line(e)}) — most likely out of memory: use a smaller "
            f"--patch-px (now {cfg.patch_px}) or --batch-size (now {cfg.batch_size}), or fewer --workers"
        ) from e


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
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)  # above a progress bar, if one is drawn


def _plot_loss(history: Sequence[dict[str, Any]], path: Path) -> None:
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
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def run(cfg: PretrainConfig, *, progress: Progress = no_progress) -> PretrainResult:
    """Run (or resume) pretraining into ``cfg.out``.

    ``progress`` gets stages ``patches``, ``preload`` and ``train`` (optimizer steps done of the
    run's total, before every step). A ``Cancelled`` it raises during ``train`` stops the run
    after writing a checkpoint of the steps done so far (single process), which ``--resume``
    continues exactly; raised earlier, nothing of the run is written.
    """
    cfg.validate()
    _device(cfg)
    info = init_distributed(cfg.device)
    try:
        return _run(cfg, info, progress)
    finally:
        cleanup()


def _run(cfg: PretrainConfig, info: DistInfo, progress: Progress) -> PretrainResult:
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
        if "sha256" not in ckpt:
            _log(info, cfg, f"note: {ckpt_path} has no checksum (an older version wrote it)")
        _check_resume(ckpt["config"], cfg, ckpt_path)
    elif cfg.resume:
        _log(info, cfg, f"note: {ckpt_path} does not exist yet; starting a new run")

    if cfg.batch_size % info.world_size:
        raise HistoclusterError(
            f"--batch-size {cfg.batch_size} does not split over {info.world_size} processes — "
            f"use a multiple of {info.world_size}"
        )
    local_batch = cfg.batch_size // info.world_size
    precision = _precision(cfg, dev)
    amp_dtype = autocast_dtype(precision)
    channels_last = amp_dtype is not None
    _check_memory(cfg, local_batch, dev)

    warnings: list[str] = []  # printed by the runner at the end, also with --quiet

    def note(msg: str) -> None:
        if msg.startswith("warning: "):
            warnings.append(msg.removeprefix("warning: "))
        else:
            _log(info, cfg, msg)

    # patches: sampled once per run; a resumed run reads the set it started with
    patches_csv = out / "patches.csv"
    if ckpt is not None and patches_csv.exists():
        records = read_patch_csv(patches_csv)
    else:
        records = build_patch_set(
            cfg.data, mpp=cfg.mpp, patch_px=cfg.patch_px, max_per_slide=cfg.max_per_slide,
            fraction=cfg.fraction, seed=cfg.seed, slide_mpp=cfg.slide_mpp,
            log=note, progress=progress,
        )  # fmt: skip
    if len(records) < cfg.batch_size:
        raise HistoclusterError(
            f"{cfg.data[0]}: --batch-size {cfg.batch_size} is larger than the dataset "
            f"({len(records)} patches) — lower --batch-size or add data"
        )

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
        warnings += ds.preload(progress=progress)
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
    order = _EpochOrder(sampler, local_batch)
    workers = cfg.workers if cfg.workers is not None else _default_workers(dev, augment_on, preload)
    loader_gen = torch.Generator()
    loader = make_loader(ds, order, local_batch, dev, augment_on, workers, loader_gen)
    steps_per_epoch = len(sampler) // local_batch
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
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    start_epoch, step, epoch_step = 0, 0, 0
    partial_loss, partial_seconds = 0.0, 0.0
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
        epoch_step = int(ckpt.get("epoch_step", 0))
        partial_loss = float(ckpt.get("epoch_loss_sum", 0.0))
        partial_seconds = float(ckpt.get("epoch_seconds", 0.0))
        _set_rng_state(ckpt["rng"])
    ddp_model: nn.Module = model
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_model = DDP(model, device_ids=[dev] if dev.type == "cuda" else None)
    criterion = NTXentLoss(cfg.temperature)
    augment = BatchAugment(aug_cfg).to(dev)

    resolved = {
        "lr_resolved": lr, "world_size": info.world_size, "device": str(dev),
        "precision": precision, "autocast": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
        "channels_last": channels_last, "local_batch": local_batch, "workers": workers,
        "augment_on": augment_on, "preloaded": preload, "n_patches": len(ds),
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
        "torch": torch.__version__,
    }  # fmt: skip
    metrics_path = out / "metrics.jsonl"
    history = _read_metrics(metrics_path, start_epoch) if info.is_main else []
    if info.is_main:
        cli.write_config(out / "config.json", cfg, **resolved)
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))
    at = f"{start_epoch}" + (f" (+{epoch_step} steps)" if epoch_step else "")
    _log(
        info, cfg,
        f"pretrain: {len(ds)} patches, {cfg.arch}, batch {cfg.batch_size} ({info.world_size} x "
        f"{local_batch}), {cfg.optimizer} lr {lr:.4g}, {resolved['autocast']}"
        f"{' + channels_last' if channels_last else ''} on {dev}, epochs {at}->{cfg.epochs}",
    )  # fmt: skip

    mem_fmt = torch.channels_last if channels_last else torch.contiguous_format
    amp = autocast_context(dev, amp_dtype)
    encoder_config = {**asdict(cfg), **resolved}

    def save(epoch: int, epoch_step: int = 0, loss_sum: float = 0.0, seconds: float = 0.0) -> None:
        """Checkpoint after ``epoch`` whole epochs and ``epoch_step`` steps of the next one."""
        if not info.is_main:
            return
        save_checkpoint(
            ckpt_path,
            {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "model": model.backbone.state_dict(), "head": model.head.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "rng": _rng_state(), "epoch": epoch, "step": step, "epoch_step": epoch_step,
                "epoch_loss_sum": loss_sum, "epoch_seconds": seconds,
                "config": json.loads(json.dumps(asdict(cfg), default=str)),
            },
        )  # fmt: skip
        save_encoder(
            out / "encoder.pt", model.backbone, cfg.arch, IMAGENET_MEAN, IMAGENET_STD,
            cfg.patch_px, encoder_config,
        )  # fmt: skip
        if history:
            _plot_loss(history, out / "loss.png")

    ddp_model.train()
    for epoch in range(start_epoch, cfg.epochs):
        skip = epoch_step if epoch == start_epoch else 0
        seed = _epoch_seed(cfg.seed, epoch, info.rank)
        if not skip:  # a run resumed mid-epoch continues from the checkpoint's RNG state instead
            torch.manual_seed(seed)  # augmentation draws of this epoch (device path, workers=0)
        loader_gen.manual_seed(seed)  # worker seeds of this epoch (loader path)
        order.set(epoch, skip)
        loss_sum = torch.full((), partial_loss if skip else 0.0, device=dev)
        seconds_before = partial_seconds if skip else 0.0
        t0 = time.perf_counter()
        batches = iter(loader)
        for i in range(skip, steps_per_epoch):
            try:
                progress("train", step, total_steps)
            except Cancelled:
                if not info.distributed:  # the other ranks would not stop with this one
                    seconds = seconds_before + time.perf_counter() - t0
                    save(epoch, i, float(loss_sum.item()), seconds)
                raise
            batch = _next_batch(batches, cfg)
            views = make_views(batch, augment if augment_on == "device" else None, dev, mem_fmt)
            loss = train_step(ddp_model, views, criterion, optimizer, scheduler, scaler, amp)
            step += 1
            loss_sum += loss
        del batches
        seconds = seconds_before + time.perf_counter() - t0
        mean_loss = float(all_reduce_mean(loss_sum / steps_per_epoch).item())
        if not math.isfinite(mean_loss):
            raise HistoclusterError(
                f"{out}: the loss became {mean_loss} in epoch {epoch + 1} — lower --lr or use --precision fp32"
            )
        row = {
            "epoch": epoch + 1, "step": step, "loss": mean_loss,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": (steps_per_epoch - skip) * cfg.batch_size / max(seconds - seconds_before, 1e-9),
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
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            save(epoch + 1)
        barrier()
    if start_epoch >= cfg.epochs:
        save(start_epoch)  # nothing left to train: refresh encoder.pt and loss.png
    progress("train", step, total_steps)
    barrier()
    end = max(start_epoch, cfg.epochs)
    return PretrainResult(
        out=out, epochs=end, step=step, history=tuple(history), config=resolved,
        encoder=out / "encoder.pt", warnings=tuple(warnings),
    )  # fmt: skip


def _check_resume(saved: dict[str, Any], cfg: PretrainConfig, path: Path) -> None:
    now = json.loads(json.dumps(asdict(cfg), default=str))
    for key in _RESUME_KEYS:
        if saved.get(key) != now.get(key):
            flag = "--" + key.replace("_", "-")
            raise HistoclusterError(
                f"{path}: was trained with {flag} {saved.get(key)}, not {now.get(key)} — "
                f"rerun with the same settings or choose a new --out"
            )


def _report(cfg: PretrainConfig, result: PretrainResult) -> str:
    last = result.history[-1] if result.history else None
    tail = f", final loss {last['loss']:.4f}" if last else ""
    return (
        f"{cfg.out}: trained {result.epochs} epochs ({result.step} steps){tail}\n"
        f"wrote {result.encoder}"
    )


DESCRIPTION = (
    "SimCLR pretraining of a ResNet on unlabeled slides and image folders, with the paper's "
    "augmentations, NT-Xent loss and LARS/LAMB/Adam (Ciga, Xu and Martel). "
    "Several processes: torchrun --nproc-per-node N -m engine.pretrain ..."
)
EPILOG = (
    "Fixed choices of the paper: weight decay 1e-6 (not on biases and batch-norm), linear warm-up "
    "for 10 epochs (at most a tenth of the run) then cosine decay to 0, projection head "
    "Linear-ReLU-Linear to 128. Outputs in --out: checkpoint.pt, encoder.pt, metrics.jsonl, "
    "loss.png, config.json, patches.csv. Exit status: 0 done, 2 bad input (one line on stderr), "
    "130 interrupted (continue with --resume)."
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m engine.pretrain``; exit status 0 / 2 / 130 (see :mod:`engine.cli`)."""
    return cli.main(PretrainConfig, run, argv, description=textwrap.fill(DESCRIPTION, 79),
                    epilog=textwrap.fill(EPILOG, 79), report=_report, report_stream="stdout",
                    interrupted_hint="rerun with --resume to continue from the last checkpoint")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
