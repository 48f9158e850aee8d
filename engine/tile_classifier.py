"""A tile classifier over stored features, saved weights-only (npz + JSON, never a pickle).

The model is a linear softmax over standardised features (multinomial logistic regression from
scikit-learn, class-balanced) or a one-hidden-layer MLP head trained with torch. Both predict with
numpy alone, so applying a model over a large store needs no torch and no scikit-learn:

    z = (x - mean) / scale                  x: (N, dim) float32
    h = max(0, z @ W1.T + b1)               MLP only: W1 (hidden, dim)
    p = softmax(h @ W.T + b)                W (classes, dim or hidden), p: (N, classes)

The file pair is ``MODEL.npz`` (the arrays) and ``MODEL.json`` (classes, colours, the
``EncoderId`` and ``Tiling`` it was trained on, the npz's sha256, validation metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.encoder_id import EncoderId
from engine.errors import HistoclusterError, one_line
from engine.files import atomic_write, atomic_write_json, sha256_file
from engine.tiling import Tiling

__all__ = ["FORMAT", "ModelKind", "TileClassifier", "fit_classifier"]

FORMAT = "histocluster-tile-classifier"
FORMAT_VERSION = 1
ModelKind = Literal["logistic", "mlp"]


@dataclass
class TileClassifier:
    """A trained tile classifier and what it was trained on.

    Attributes:
        classes: class names, in the order of the probability columns.
        colours: one ``#rrggbb`` per class.
        arrays: ``mean``, ``scale`` (dim,), ``W`` (classes, d), ``b`` (classes,), and for the MLP
            ``W1`` (hidden, dim), ``b1`` (hidden,).
        encoder, tiling: the features it reads; features of another encoder or tiling are refused.
        kind: "logistic" or "mlp".
        metrics: validation figures (per class precision / recall / F1, confusion matrix).
    """

    classes: list[str]
    colours: list[str]
    arrays: dict[str, np.ndarray]
    encoder: EncoderId
    tiling: Tiling
    kind: ModelKind = "logistic"
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.arrays["mean"].shape[0])

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, dim) features -> (N, classes) float32 probabilities."""
        z = (np.asarray(features, np.float32) - self.arrays["mean"]) / self.arrays["scale"]
        if self.kind == "mlp":
            z = np.maximum(z @ self.arrays["W1"].T + self.arrays["b1"], 0.0)
        logits = z @ self.arrays["W"].T + self.arrays["b"]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def check_features(self, encoder: EncoderId, tiling: Tiling, where: str) -> None:
        """Refuse features of another encoder or tiling with one line naming both."""
        if not self.encoder.same_features(encoder):
            raise HistoclusterError(
                f"{where}: holds features of encoder {encoder.describe()}, the classifier was trained "
                f"on {self.encoder.describe()} — apply it to a store made with that encoder, or train "
                "a classifier on this store"
            )
        diff = self.tiling.differences(tiling)
        if diff:
            raise HistoclusterError(
                f"{where}: was tiled otherwise than the classifier's training store "
                f"(classifier vs store: {', '.join(diff)}) — use a store with the same tiling"
            )

    # -------------------------------------------------------------- files

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.npz`` and ``<path>.json`` (``path`` may end in either); returns the JSON path."""
        npz, meta = _paths(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(npz, lambda f: np.savez(f, **self.arrays))
        atomic_write_json(
            meta,
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": self.kind,
                "classes": self.classes,
                "colours": self.colours,
                "encoder": self.encoder.to_attrs(),
                "tiling": self.tiling.to_attrs(),
                "arrays_sha256": sha256_file(npz),
                "metrics": self.metrics,
            },
        )
        return meta

    @classmethod
    def load(cls, path: str | Path) -> TileClassifier:
        """Read a model written by :meth:`save` (no pickle: ``np.load(allow_pickle=False)``)."""
        npz, meta_path = _paths(path)
        for p in (meta_path, npz):
            if not p.is_file():
                raise HistoclusterError(
                    f"{p}: no such file — give the MODEL written by python -m engine.classify train"
                )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            if meta.get("arrays_sha256") != sha256_file(npz):
                raise ValueError(f"{npz.name} does not match its sha256 (altered or replaced)")
            with np.load(npz, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k], np.float32) for k in data.files}
            model = cls(
                classes=list(meta["classes"]),
                colours=list(meta["colours"]),
                arrays=arrays,
                encoder=EncoderId.from_attrs(meta["encoder"]),
                tiling=Tiling.from_attrs(meta["tiling"]),
                kind=meta.get("kind", "logistic"),
                metrics=meta.get("metrics", {}),
            )
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise HistoclusterError(
                f"{meta_path}: not a readable tile classifier ({one_line(e)}) — train it again with "
                "python -m engine.classify train"
            ) from e
        if model.arrays["W"].shape[0] != len(model.classes):
            raise HistoclusterError(
                f"{meta_path}: {len(model.classes)} classes but weights for {model.arrays['W'].shape[0]} "
                "— train it again"
            )
        return model


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    return stem.with_name(stem.name + ".npz"), stem.with_name(stem.name + ".json")


# ------------------------------------------------------------------------------ fitting


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-6] = 1.0
    return mean.astype(np.float32), scale.astype(np.float32)


def fit_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    kind: ModelKind = "logistic",
    seed: int = 0,
    c: float = 1.0,
    hidden: int = 256,
    epochs: int = 60,
) -> dict[str, np.ndarray]:
    """Fit the arrays of a classifier on ``features`` (N, dim) and ``labels`` (N,) in [0, n_classes).

    Class-balanced in both kinds. Classes absent from ``labels`` get a large negative bias, so
    they are never predicted.
    """
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    mean, scale = _standardise(x)
    z = (x - mean) / scale
    present = np.unique(y)
    if kind == "logistic":
        W, b = _fit_logistic(z, y, present, n_classes, seed, c)
        return {"mean": mean, "scale": scale, "W": W, "b": b}
    W1, b1, W, b = _fit_mlp(z, y, n_classes, seed, hidden, epochs)
    return {"mean": mean, "scale": scale, "W1": W1, "b1": b1, "W": W, "b": b}


def _fit_logistic(
    z: np.ndarray, y: np.ndarray, present: np.ndarray, n_classes: int, seed: int, c: float
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression

    W = np.zeros((n_classes, z.shape[1]), np.float32)
    b = np.full(n_classes, -1e4, np.float32)
    if len(present) == 1:
        b[present[0]] = 0.0
        return W, b
    lr = LogisticRegression(C=c, class_weight="balanced", max_iter=500, random_state=seed)
    lr.fit(z, y)
    coef, intercept = lr.coef_.astype(np.float32), lr.intercept_.astype(np.float32)
    if len(present) == 2:  # sklearn's binary form: p(second) = sigmoid(z @ w + b)
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2], np.float32)
    W[lr.classes_] = coef
    b[lr.classes_] = intercept
    return W, b


def _fit_mlp(
    z: np.ndarray, y: np.ndarray, n_classes: int, seed: int, hidden: int, epochs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(z.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)
    )
    counts = np.bincount(y, minlength=n_classes).astype(np.float32)
    weight = np.where(
        counts > 0, len(y) / (np.maximum(counts, 1) * max(1, (counts > 0).sum())), 0.0
    )
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(weight.astype(np.float32)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    xt, yt = torch.from_numpy(z), torch.from_numpy(y)
    batch = 512
    for _ in range(epochs):
        order = torch.randperm(len(yt), generator=g)
        for i in range(0, len(order), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    with torch.no_grad():
        b_absent = torch.where(torch.from_numpy(counts) > 0, 0.0, -1e4)
        model[2].bias += b_absent
    return tuple(
        p.detach().numpy().astype(np.float32)
        for p in (model[0].weight, model[0].bias, model[2].weight, model[2].bias)
    )  # type: ignore[return-value]
