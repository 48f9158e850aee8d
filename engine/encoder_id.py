"""EncoderId: what makes two encoders give the same features (stored with every feature store).

Light on purpose (no torch): the store, the GUI and a classifier file compare identities
without loading a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["EncoderId"]


def _close(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


@dataclass(frozen=True)
class EncoderId:
    """The identity of an encoder's features.

    Attributes:
        name: the spec the user gave (a registry name such as ``resnet18-random``, or a file path).
        arch: the architecture (``resnet18``, a timm model name, ...).
        dim: length of one tile's feature vector.
        input_px: side of the (square) image the model sees.
        mean, std: per-channel normalisation applied to [0, 1] RGB.
        sha256: hex sha256 of the weights file, or None for weights defined by ``name`` alone
            (seeded random, torchvision's ImageNet release, a hub id).
        embedding: how a feature vector is formed from the model's output (``pooled`` for a
            ResNet's global average pool, ``cls``, ``cls+mean_patch``, ...).
        source: where the weights came from (a Hugging Face hub id, a release URL); provenance
            only: the weights themselves are identified by ``sha256``.
    """

    name: str
    arch: str
    dim: int
    input_px: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    sha256: str | None = None
    embedding: str = "pooled"
    source: str | None = None

    @property
    def weights(self) -> str:
        """What the weights are: ``sha256:<hex>`` of the file, else the name that defines them."""
        return f"sha256:{self.sha256}" if self.sha256 else f"name:{self.name}"

    def to_attrs(self) -> dict[str, Any]:
        """JSON-ready attributes (the store's ``encoder`` attrs)."""
        return {
            "spec": self.name,
            "arch": self.arch,
            "dim": int(self.dim),
            "input_px": int(self.input_px),
            "mean": [float(v) for v in self.mean],
            "std": [float(v) for v in self.std],
            "sha256": self.sha256,
            "embedding": self.embedding,
            "source": self.source,
        }

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> EncoderId:
        """Inverse of :meth:`to_attrs` (stores written before ``embedding`` existed read as pooled)."""
        return cls(
            name=str(attrs.get("spec") or attrs.get("name")),
            arch=str(attrs["arch"]),
            dim=int(attrs["dim"]),
            input_px=int(attrs["input_px"]),
            mean=tuple(float(v) for v in attrs["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in attrs["std"]),  # type: ignore[arg-type]
            sha256=attrs.get("sha256") or None,
            embedding=str(attrs.get("embedding") or "pooled"),
            source=attrs.get("source") or None,
        )

    def differences(self, other: EncoderId) -> list[str]:
        """Names of the properties whose difference makes the features of the two incomparable."""
        diff = [
            k
            for k in ("arch", "dim", "input_px", "embedding", "weights")
            if getattr(self, k) != getattr(other, k)
        ]
        if not all(
            _close(a, b) for a, b in zip(self.mean + self.std, other.mean + other.std, strict=True)
        ):
            diff.append("normalisation")
        return diff

    def same_features(self, other: EncoderId) -> bool:
        """True when both give the same features for the same pixels."""
        return not self.differences(other)

    def describe(self) -> str:
        """One short phrase: ``spec (arch, dim-d, sha256 0123456789ab)``."""
        sha = f", sha256 {self.sha256[:12]}" if self.sha256 else ""
        return f"{self.name} ({self.arch}, {self.dim}-d{sha})"
