"""The configuration of one ``python -m engine.evaluate`` run: every flag, its default and help once.

The command line is generated from :class:`EvalConfig` by :mod:`engine.cli`; library callers
(tests, a GUI) build it directly, with lists or tuples and strings or paths alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from engine.cli import option
from engine.encode import PRECISIONS
from engine.evaluate.datasets import Task
from engine.evaluate.images import FitMode
from engine.evaluate.splits import PAPER_FRACTIONS

__all__ = ["DEFAULT_LR", "PROTOCOLS", "EvalConfig"]

PROTOCOLS: tuple[str, ...] = ("linear", "finetune", "knn")
#: Adam learning rate per protocol when --lr is not given
DEFAULT_LR: dict[str, float] = {"linear": 1e-3, "finetune": 1e-4, "knn": 0.0}

_FRACTIONS = (100.0,)
_SEEDS = (0, 1, 2)
_PROTOCOLS = ("linear",)
#: fields that name the grid or how it runs, not what its results mean; the rest is the
#: signature a resumed run must share
_NOT_IN_SIGNATURE = frozenset(
    {"encoders", "protocols", "fractions", "seeds", "out", "device", "workers",
     "feature_cache", "trust_checkpoint", "quiet"}
)  # fmt: skip


def _listed(values: Sequence[Any]) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _percent(text: str) -> float:
    """``"10"`` or ``"10%"`` -> 10.0."""
    return float(text.strip().rstrip("%"))


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation run.

    The grid is ``encoders x protocols x fractions x seeds``; every other field that changes
    results is part of the run's :meth:`signature`, which must match for a re-run to resume in
    the same ``out``.
    """

    encoders: tuple[str, ...] = option(
        help="comma-separated encoder specs: resnet18-random, resnet50-imagenet, "
        "ciga-resnet18, or checkpoint paths",
        sep=",",
    )
    dataset: Path = option(help="dataset path (see below)", parse=Path)
    task: Task = option("classification", help="what the dataset's labels are")
    protocols: tuple[str, ...] = option(
        _PROTOCOLS,
        help=f"comma-separated, of {', '.join(PROTOCOLS)} (segmentation: finetune only) "
        f"(default: {_listed(_PROTOCOLS)})",
        flag="--protocol",
        sep=",",
        show_default=False,
    )
    fractions: tuple[float, ...] = option(
        _FRACTIONS,
        help="training-data percentages, comma-separated; the paper uses "
        f"{_listed(PAPER_FRACTIONS)} (default: {_listed(_FRACTIONS)})",
        sep=",",
        parse=_percent,
        show_default=False,
    )
    seeds: tuple[int, ...] = option(
        _SEEDS,
        help=f"seeds (split, subset, initialisation) (default: {_listed(_SEEDS)})",
        sep=",",
        show_default=False,
    )
    epochs: int = option(
        100, help="training epochs for linear, finetune and segmentation (paper: 100)"
    )
    out: Path = option(Path("evaluate-out"), help="output folder", parse=Path)
    device: str = option("auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    workers: int = option(2, help="data-loading workers")
    batch_size: int = option(32, help="training batch size (paper: 32)")
    lr: float | None = option(
        None, help="Adam learning rate; default 1e-3 for linear, 1e-4 for fine-tuning"
    )
    weight_decay: float | None = option(
        None, help="default: 1e-5 for resnet18, 1e-4 otherwise (paper)"
    )
    k: int = option(20, help="neighbours for knn (cosine)")
    input_px: int | None = option(
        None,
        help="image size fed to the encoder (segmentation: crop size); "
        "default: the encoder's own (224)",
    )
    fit: FitMode = option(
        "resize",
        help="how images are fitted to --input-px: resize (whole image), resize-crop "
        "(shorter side, then centre crop) or crop (centre crop, native scale)",
    )
    split_seed: int | None = option(
        None,
        help="fix the train/val/test split to this seed for all --seeds "
        "(default: each seed draws its own split)",
    )
    seg_scale: float = option(
        1.0, help="segmentation: resize images and masks by this factor first"
    )
    seg_crops: int = option(4, help="segmentation: random training crops per image per epoch")
    feature_cache: Path | None = option(
        None, help="folder for cached frozen features; default: OUT/features", parse=Path
    )
    precision: str = option(
        "fp32",
        help="precision of the frozen-feature pass (linear, knn): fp32 as the paper, or "
        "bf16 / fp16 / auto (bf16 or fp16 on CUDA, bf16 on CPUs with native bf16) for speed",
        choices=PRECISIONS,
    )
    trust_checkpoint: bool = option(
        False, help="allow pickled checkpoints (only for files you trust)"
    )
    quiet: bool = option(False, help="no progress bars or notes")

    def __post_init__(self) -> None:
        # library callers may pass lists and strings; the config holds tuples and paths
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("encoders", tuple(s.strip() for s in _seq(self.encoders) if str(s).strip()))
        put("protocols", tuple(s.strip() for s in _seq(self.protocols) if str(s).strip()))
        put("fractions", tuple(float(f) for f in _seq(self.fractions)))
        put("seeds", tuple(int(s) for s in _seq(self.seeds)))
        put("dataset", Path(self.dataset))
        put("out", Path(self.out))
        if self.feature_cache is not None:
            put("feature_cache", Path(self.feature_cache))

    def lr_for(self, protocol: str) -> float:
        """--lr, or the protocol's default (:data:`DEFAULT_LR`)."""
        return self.lr if self.lr is not None else DEFAULT_LR[protocol]

    def cache_dir(self) -> Path:
        """Where features are cached: --feature-cache or ``OUT/features``."""
        return self.feature_cache if self.feature_cache is not None else self.out / "features"

    def signature(self) -> dict[str, Any]:
        """The settings that must not change between runs that share ``out`` (JSON values)."""
        d = self.to_json()
        return {k: v for k, v in d.items() if k not in _NOT_IN_SIGNATURE}

    @classmethod
    def signature_default(cls, key: str) -> Any:
        """The JSON value of field ``key``'s default (a run recorded before ``key`` existed)."""
        for f in fields(cls):
            if f.name == key:
                return json.loads(json.dumps(f.default, default=str))
        return None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings, tuples as lists; the dataset path resolved)."""
        d = asdict(self)
        d["dataset"] = str(Path(self.dataset).expanduser().resolve())
        return json.loads(json.dumps(d, default=str))


def _seq(value: Any) -> Sequence[Any]:
    """A single string or number as a one-item sequence; sequences as they are."""
    if isinstance(value, (str, bytes, int, float)):
        return (value,)
    return tuple(value)
