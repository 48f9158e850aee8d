"""The configuration of one ``python -m engine.evaluate`` run (built by :mod:`.cli`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.evaluate.datasets import Task
from engine.evaluate.images import FitMode

__all__ = ["DEFAULT_LR", "PROTOCOLS", "EvalConfig"]

PROTOCOLS: tuple[str, ...] = ("linear", "finetune", "knn")
#: Adam learning rate per protocol when --lr is not given
DEFAULT_LR: dict[str, float] = {"linear": 1e-3, "finetune": 1e-4, "knn": 0.0}


@dataclass
class EvalConfig:
    """Everything that decides an evaluation run's results.

    The grid is ``encoders x protocols x fractions x seeds``; every other field is part of the
    run's :meth:`signature`, which must match for a re-run to resume in the same ``out``.
    """

    encoders: list[str]
    dataset: Path
    task: Task = "classification"
    protocols: list[str] = field(default_factory=lambda: ["linear"])
    fractions: list[float] = field(default_factory=lambda: [100.0])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    epochs: int = 100
    out: Path = Path("evaluate-out")
    device: str = "auto"
    workers: int = 2
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float | None = None
    k: int = 20
    input_px: int | None = None
    fit: FitMode = "resize"
    split_seed: int | None = None
    seg_scale: float = 1.0
    seg_crops: int = 4
    feature_cache: Path | None = None
    trust_checkpoint: bool = False
    quiet: bool = False

    def lr_for(self, protocol: str) -> float:
        """--lr, or the protocol's default (:data:`DEFAULT_LR`)."""
        return self.lr if self.lr is not None else DEFAULT_LR[protocol]

    def cache_dir(self) -> Path:
        """Where features are cached: --feature-cache or ``OUT/features``."""
        return self.feature_cache if self.feature_cache is not None else self.out / "features"

    def signature(self) -> dict[str, Any]:
        """The settings that must not change between runs that share ``out``."""
        d = self.to_json()
        for grid_or_runtime in (
            "encoders", "protocols", "fractions", "seeds", "out", "device", "workers",
            "feature_cache", "trust_checkpoint", "quiet",
        ):  # fmt: skip
            d.pop(grid_or_runtime)
        return d

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings; the dataset path resolved)."""
        d = asdict(self)
        d["dataset"] = str(Path(self.dataset).expanduser().resolve())
        for key in ("out", "feature_cache"):
            d[key] = None if d[key] is None else str(d[key])
        return d
