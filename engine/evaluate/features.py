"""Frozen-encoder features for the linear and kNN protocols: computed once per
(encoder weights, dataset, input size, fit mode) and cached on disk as ``.npy``.

The cache key hashes the encoder's weights themselves (not its name), so two random
initialisations never share a cache entry and a retrained checkpoint at the same path is
recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from engine.evaluate.datasets import Samples
from engine.evaluate.images import FitMode
from engine.evaluate.loaders import ImageDataset, make_loader

__all__ = ["cached_features", "compute_features", "feature_cache_key", "weights_digest"]


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over the names, shapes and bytes of ``module``'s state_dict."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def feature_cache_key(encoder: torch.nn.Module, samples: Samples, px: int, fit: FitMode) -> str:
    """A 24-hex-digit key for the features of ``encoder`` on ``samples`` at ``px`` / ``fit``."""
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
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@torch.inference_mode()
def compute_features(
    encoder: torch.nn.Module,
    samples: Samples,
    px: int,
    fit: FitMode = "resize",
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
) -> np.ndarray:
    """``encoder`` over every sample -> ``(N, dim)`` float32, in sample order."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval().to(device)
    ds = ImageDataset(samples, px, encoder.mean, encoder.std, fit=fit)
    loader = make_loader(
        ds, batch_size, shuffle=False, workers=workers, pin_memory=device.type == "cuda"
    )
    out: list[np.ndarray] = []
    for x, _ in tqdm(loader, desc="features", disable=not progress, leave=False):
        f = encoder(x.to(device, non_blocking=True))
        out.append(f.float().reshape(len(x), -1).cpu().numpy())
    encoder.train(was_training)
    return np.concatenate(out, axis=0)


def cached_features(
    cache_dir: str | Path,
    encoder: torch.nn.Module,
    samples: Samples,
    px: int,
    fit: FitMode = "resize",
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = False,
    label: str = "",
) -> tuple[np.ndarray, Path, bool]:
    """Features of ``encoder`` on ``samples``, from ``cache_dir`` when present.

    Returns ``(features (N, dim) float32, cache file, True if it was read from the cache)``.
    The file is written atomically (temp file + rename), so an interrupted run leaves no
    half-written cache entry.
    """
    cache_dir = Path(cache_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:60].strip("_") or "features"
    path = cache_dir / f"{stem}-{feature_cache_key(encoder, samples, px, fit)}.npy"
    if path.is_file():
        feats = np.load(path)
        if feats.shape[0] == len(samples):
            return feats, path, True
    feats = compute_features(encoder, samples, px, fit, device, batch_size, workers, progress)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, feats)
    os.replace(tmp, path)
    return feats, path, False
