"""Frozen-encoder features for the linear and kNN protocols: computed once per
(encoder weights, dataset, input size, fit mode, precision) and cached on disk as ``.npy``.

The cache key hashes the encoder's weights themselves (not its name or file), so an encoder
changed in memory, or a retrained checkpoint at the same path, is never served stale features.
Tiles are encoded by :class:`engine.encode.TileEncoder`, the code path extraction uses.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.encode import TileEncoder, resolve_precision
from engine.evaluate.datasets import Samples
from engine.evaluate.images import FitMode
from engine.evaluate.loaders import FittedTiles, make_loader
from engine.files import atomic_write
from engine.models import Encoder
from engine.progress import Progress, Throttle, no_progress

__all__ = [
    "FeatureSettings",
    "LabelledFeatures",
    "at_input_px",
    "cached_features",
    "compute_features",
    "feature_cache_key",
    "weights_digest",
]


@dataclass(frozen=True)
class FeatureSettings:
    """How features are computed: each image fitted to ``px`` x ``px`` (``fit``), encoded on
    ``device`` in batches of ``batch_size`` read by ``workers`` processes, at ``precision``
    (``auto`` is resolved for the device by :func:`cached_features`)."""

    px: int
    fit: FitMode = "resize"
    device: torch.device | str = "cpu"
    batch_size: int = 64
    workers: int = 0
    precision: str = "fp32"


@dataclass(frozen=True)
class LabelledFeatures:
    """What the kNN and linear protocols see: ``features`` (N, D) float32 with their ``targets``
    (N,) (int64 classes, or float32 for regression), the ``task`` and its ``num_classes``."""

    features: np.ndarray
    targets: np.ndarray
    task: str
    num_classes: int


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names, shapes and bytes of ``module``'s state_dict (in memory)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_cache_key(
    encoder: Encoder, samples: Samples, px: int, fit: FitMode, precision: str = "fp32"
) -> str:
    """A 24-hex-digit key for the features of ``encoder`` on ``samples`` at ``px`` / ``fit``.

    ``precision`` is the resolved one (fp32, bf16, fp16); fp32 keys are those of earlier runs.
    """
    payload = {
        "weights": weights_digest(encoder),
        "arch": getattr(encoder, "arch", type(encoder).__name__),
        "mean": list(map(float, encoder.mean)),
        "std": list(map(float, encoder.std)),
        "px": int(px),
        "fit": fit,
        "data": samples.images.fingerprint(),
        "version": 1,
    }
    if precision != "fp32":
        payload["precision"] = precision
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def at_input_px(encoder: Encoder, px: int) -> Encoder:
    """``encoder`` fed ``px`` x ``px`` images (sharing its backbone), so that
    :meth:`Encoder.preprocess` does not resize the fitted images to the encoder's own size."""
    if encoder.input_px == px:
        return encoder
    return Encoder(
        encoder.backbone, encoder.arch, encoder.mean, encoder.std, px, encoder.spec,
        sha256=encoder.sha256, config=encoder.config,
    )  # fmt: skip


def compute_features(
    encoder: Encoder,
    samples: Samples,
    how: FeatureSettings,
    progress: Progress = no_progress,
) -> np.ndarray:
    """``encoder`` over every sample -> ``(N, dim)`` float32, in sample order.

    Reports ``progress("features", images encoded, N)``; a ``Cancelled`` it raises stops here.
    """
    device = torch.device(how.device)
    was_training = encoder.training
    tiles = TileEncoder(at_input_px(encoder, how.px), device, how.precision)
    loader = make_loader(
        FittedTiles(samples, how.px, how.fit), how.batch_size, shuffle=False,
        workers=how.workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    report = Throttle(progress)
    out: list[np.ndarray] = []
    done = 0
    try:
        report("features", 0, len(samples))
        for x in loader:
            f = tiles(x)
            out.append(f.reshape(len(x), -1).cpu().numpy())
            done += len(x)
            report("features", done, len(samples))
    finally:
        # leave the caller's encoder as it was (TileEncoder switched it to eval, channels_last)
        encoder.train(was_training).to(memory_format=torch.contiguous_format)
    return np.concatenate(out, axis=0)


def cached_features(
    cache_dir: str | Path,
    encoder: Encoder,
    samples: Samples,
    how: FeatureSettings,
    progress: Progress = no_progress,
    label: str = "",
) -> tuple[np.ndarray, Path, bool]:
    """Features of ``encoder`` on ``samples``, from ``cache_dir`` when present.

    ``how.precision``: as ``--precision`` (``auto`` resolved for ``how.device``). Returns
    ``(features (N, dim) float32, cache file, True if it was read from the cache)``. The file is
    written atomically, so an interrupted run leaves no half-written cache entry.
    """
    how = replace(how, precision=resolve_precision(how.precision, torch.device(how.device)))
    key = feature_cache_key(encoder, samples, how.px, how.fit, how.precision)
    cache_dir = Path(cache_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:60].strip("_") or "features"
    path = cache_dir / f"{stem}-{key}.npy"
    if path.is_file():
        try:
            feats = np.load(path)
        except (OSError, ValueError):
            feats = None  # damaged cache entry: compute it again
        if feats is not None and feats.shape[0] == len(samples):
            return feats, path, True
    feats = compute_features(encoder, samples, how, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.save(f, feats))
    return feats, path, False
