"""Encoders: torchvision ResNets, the SimCLR projection head, and ``load_encoder`` for every checkpoint kind.

A spec given to :func:`load_encoder` is one of

- ``resnet18-random`` (or 34/50/101): torchvision weights=None, seeded so a spec always gives the
  same weights; ImageNet normalization, 224 px. Baselines.
- ``resnet18-imagenet`` (or 34/50/101): torchvision's ``DEFAULT`` ImageNet weights, downloaded by
  torchvision into its hub cache; offline this fails with a one-line :class:`CheckpointError`.
- ``ciga-resnet18``: the paper's released ResNet-18 in the cache of ``python -m engine.fetch_weights``.
- a path to a checkpoint file, any of
  * the ``histocluster-encoder`` format written by :func:`save_encoder` (``engine.pretrain``);
  * a released checkpoint of Ciga et al.: ``{"state_dict": {"model.resnet.<torchvision name>": ...,
    "model.resnet.fc.1.*", "model.resnet.fc.3.*"}}``, 224 px, mean 0.5, std 0.5;
  * a plain torchvision ResNet state_dict (arch inferred from the keys), ImageNet normalization.

Files are read with ``torch.load(weights_only=True)``; a file that needs pickle (PyTorch Lightning)
loads only with ``trust_checkpoint=True`` and a warning. Keys that do not fit the architecture raise
:class:`CheckpointError` listing missing, unexpected and mis-shaped keys: never a partial load.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import ResNet
from torchvision.transforms.v2 import functional as TF

from engine.encoder_id import EncoderId
from engine.errors import CheckpointError
from engine.files import sha256_file

__all__ = [
    "ARCHS",
    "CIGA_MEAN",
    "CIGA_STD",
    "ENCODER_FORMAT",
    "ENCODER_FORMAT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Encoder",
    "ProjectionHead",
    "build_backbone",
    "default_encoder_spec",
    "feature_dim",
    "infer_arch",
    "load_encoder",
    "named_specs",
    "save_encoder",
]

ARCHS: dict[str, tuple[Callable[..., ResNet], int]] = {
    "resnet18": (torchvision.models.resnet18, 512),
    "resnet34": (torchvision.models.resnet34, 512),
    "resnet50": (torchvision.models.resnet50, 2048),
    "resnet101": (torchvision.models.resnet101, 2048),
}
_IMAGENET_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.DEFAULT,
    "resnet34": torchvision.models.ResNet34_Weights.DEFAULT,
    "resnet50": torchvision.models.ResNet50_Weights.DEFAULT,
    "resnet101": torchvision.models.ResNet101_Weights.DEFAULT,
}
# (bottleneck blocks?, blocks per stage) -> arch, for inferring the arch of a plain state_dict.
_LAYOUTS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
}

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIGA_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
CIGA_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_INPUT_PX = 224
ENCODER_FORMAT = "histocluster-encoder"
ENCODER_FORMAT_VERSION = 1
CIGA_PREFIX = "model.resnet."
CIGA_SPEC = "ciga-resnet18"
RANDOM_SEED = 0


def feature_dim(arch: str) -> int:
    """Width of the pooled pre-activation features of ``arch``: 512 (resnet18/34) or 2048 (50/101)."""
    return ARCHS[_check_arch(arch)][1]


def build_backbone(arch: str) -> ResNet:
    """A torchvision ResNet with ``weights=None`` and ``fc = Identity``: (B,3,H,W) -> (B, feature_dim)."""
    model = ARCHS[_check_arch(arch)][0](weights=None)
    model.fc = nn.Identity()
    return model


class ProjectionHead(nn.Sequential):
    """SimCLR projection head, Linear-ReLU-Linear: (B, in_dim) -> (B, out_dim)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int = 128) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)
        )
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


class Encoder(nn.Module):
    """A ResNet backbone with the input size and normalization it expects.

    ``forward``: (B,3,H,W) float, already normalised -> (B, dim) float pre-activation features.
    ``preprocess``: (B,H,W,3) uint8 RGB -> (B,3,input_px,input_px) float normalised.
    """

    def __init__(
        self,
        backbone: ResNet,
        arch: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        input_px: int,
        spec: str,
        sha256: str | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = _check_arch(arch)
        self.dim = feature_dim(arch)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_px = int(input_px)
        self.spec = spec
        self.sha256 = sha256
        self.config = dict(config or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) normalised float -> (B, dim) float."""
        return self.backbone(x)

    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 RGB (numpy or tensor) -> (B,3,input_px,input_px) float32 normalised.

        Resized with antialiased bilinear interpolation when H or W differ from ``input_px``.
        The result stays on the input's device (numpy -> CPU).
        """
        x = (
            torch.from_numpy(np.ascontiguousarray(images))
            if isinstance(images, np.ndarray)
            else images
        )
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(
                f"preprocess expects uint8 images shaped (B,H,W,3); got {x.dtype} {tuple(x.shape)}"
            )
        x = TF.to_dtype(x.permute(0, 3, 1, 2), torch.float32, scale=True)
        if x.shape[-2:] != (self.input_px, self.input_px):
            x = TF.resize(x, [self.input_px, self.input_px], antialias=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def identity(self) -> EncoderId:
        """What makes this encoder's features comparable with another's (stored with features)."""
        return EncoderId(
            name=self.spec,
            arch=self.arch,
            dim=self.dim,
            input_px=self.input_px,
            mean=self.mean,  # type: ignore[arg-type]
            std=self.std,  # type: ignore[arg-type]
            sha256=self.sha256,
            embedding="pooled",
        )

    def info(self) -> dict[str, Any]:
        """JSON-ready description (arch, dim, input px, normalization, spec, sha256) for provenance."""
        return {
            "arch": self.arch,
            "dim": self.dim,
            "input_px": self.input_px,
            "mean": list(self.mean),
            "std": list(self.std),
            "spec": self.spec,
            "sha256": self.sha256,
        }

    def extra_repr(self) -> str:
        return f"arch={self.arch}, dim={self.dim}, input_px={self.input_px}, spec={self.spec!r}"


def named_specs() -> list[str]:
    """Every spec :func:`load_encoder` accepts besides a file path."""
    return [f"{a}-{kind}" for kind in ("random", "imagenet") for a in ARCHS] + [CIGA_SPEC]


def default_encoder_spec() -> str:
    """``sample_data/sample_encoder.pt`` when the repository has one, else ``resnet18-random``."""
    sample = Path(__file__).resolve().parent.parent / "sample_data" / "sample_encoder.pt"
    return str(sample) if sample.is_file() else "resnet18-random"


def load_encoder(spec: str | Path, trust_checkpoint: bool = False) -> Encoder:
    """Load the encoder a spec names (see the module docstring); returned on CPU, fp32, eval mode.

    Raises :class:`CheckpointError` (one line) for unknown specs, missing or unreadable files,
    files that need pickle without ``trust_checkpoint``, and state_dicts that do not fit.
    """
    text = str(spec).strip()
    if not isinstance(spec, Path):
        m = re.fullmatch(r"(resnet\d+)-(random|imagenet)", text)
        if m and m.group(1) in ARCHS:
            arch, kind = m.groups()
            encoder = (
                _random_encoder(arch, text) if kind == "random" else _imagenet_encoder(arch, text)
            )
            return encoder.eval()
        if text == CIGA_SPEC:
            from engine.fetch_weights import cached_weights_path

            path = cached_weights_path()
            if not path.is_file():
                raise CheckpointError(
                    f"{path}: {CIGA_SPEC} is not downloaded — run `python -m engine.fetch_weights` "
                    "(needs internet) or pass the checkpoint's path"
                )
            return _load_file(path, trust_checkpoint, spec_text=CIGA_SPEC).eval()
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{text}: no such checkpoint file and not a known encoder — pass a checkpoint path "
            f"or one of: {', '.join(named_specs())}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint — pass a checkpoint file")
    return _load_file(path, trust_checkpoint, spec_text=str(path.resolve())).eval()


def save_encoder(
    path: str | Path,
    backbone: nn.Module,
    arch: str,
    mean: tuple[float, float, float] | list[float],
    std: tuple[float, float, float] | list[float],
    input_px: int,
    config: dict[str, Any],
    *,
    half: bool = False,
) -> Path:
    """Write ``backbone`` (a torchvision ResNet, fc ignored; DDP/compiled wrappers unwrapped) in the
    ``histocluster-encoder`` format that :func:`load_encoder` reads with ``weights_only=True``.

    ``config`` is stored JSON-normalised (paths and other objects become strings). ``half`` stores
    float tensors as fp16 (half the size; they load back as fp32). The file is written atomically.
    """
    arch = _check_arch(arch)
    if isinstance(backbone, Encoder):
        backbone = backbone.backbone
    state = {k: v for k, v in _strip_wrappers(backbone.state_dict()).items() if not _is_fc(k)}
    with torch.device("meta"):
        reference = build_backbone(arch).state_dict()
    problems = _fit_problems(state, reference)
    if problems:
        raise ValueError(f"backbone does not fit {arch}: {problems}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values each; got {mean!r}, {std!r}")
    state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": ENCODER_FORMAT,
        "version": ENCODER_FORMAT_VERSION,
        "arch": arch,
        "state_dict": state,
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "input_px": int(input_px),
        "config": json.loads(json.dumps(config, default=str)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def infer_arch(state_dict: Mapping[str, Any]) -> str:
    """The torchvision ResNet arch whose block layout matches the keys of ``state_dict``.

    Raises :class:`CheckpointError` when the layout is not one of resnet18/34/50/101.
    """
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set(), 4: set()}
    for key in state_dict:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    bottleneck = "layer1.0.conv3.weight" in state_dict
    layout = (bottleneck, tuple(len(blocks[i]) for i in (1, 2, 3, 4)))
    arch = _LAYOUTS.get(layout)
    if arch is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise CheckpointError(
            f"keys do not describe a torchvision ResNet-18/34/50/101 ({kind} blocks per stage "
            f"{layout[1]}; first keys: {', '.join(list(state_dict)[:4]) or 'none'})"
        )
    return arch


# ----------------------------------------------------------------------------- internals


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    return arch


def _is_fc(key: str) -> bool:
    return key == "fc" or key.startswith("fc.")


def _strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes shared by every key."""
    state = dict(state)
    # Both orders occur: DDP around a compiled model and torch.compile around DDP.
    for prefix in ("module.", "_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _seeded_backbone(arch: str) -> ResNet:
    """``build_backbone(arch)`` with torch's RNG seeded to RANDOM_SEED, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build_backbone(arch)


def _random_encoder(arch: str, spec: str) -> Encoder:
    return Encoder(
        _seeded_backbone(arch), arch, IMAGENET_MEAN, IMAGENET_STD, DEFAULT_INPUT_PX, spec
    )


def _imagenet_encoder(arch: str, spec: str) -> Encoder:
    weights = _IMAGENET_WEIGHTS[arch]
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError, timeouts, bad hash, bad file
        reason = " ".join(str(getattr(e, "reason", e)).split())
        raise CheckpointError(
            f"{spec}: cannot get torchvision's ImageNet weights from {weights.url} ({reason}) — "
            f"download them on a machine with internet into {cache}, or pass a local state_dict path"
        ) from e
    state = {k: v for k, v in state.items() if not _is_fc(k)}
    backbone = _seeded_backbone(arch)
    _load_fitting(backbone, state, f"{spec} ({weights.url})", arch)
    cached = cache / Path(weights.url).name
    sha = sha256_file(cached) if cached.is_file() else None
    transforms = weights.transforms()
    return Encoder(
        backbone,
        arch,
        tuple(transforms.mean),
        tuple(transforms.std),
        transforms.crop_size[0],
        spec,
        sha,
    )


def _read_checkpoint(path: Path, trust: bool) -> Any:
    """``torch.load`` on CPU, weights_only unless ``trust`` (then pickle, with a warning)."""
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive (a pickle, protocol 2+, before PyTorch 1.6): refuse anything else.
    if not head.startswith((b"\x80", b"PK\x03\x04")):
        what = "an empty file" if not head else f"starts with {head!r}"
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({what}) — the file is corrupt or of "
            "another kind (an interrupted download?); pass a .pt/.pth/.ckpt saved with torch.save"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        safe_error = e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint ({_short(e)}) — the file is corrupt, "
            "truncated or of another kind; pass a .pt/.pth/.ckpt saved with torch.save"
        ) from e
    needed = re.search(r"GLOBAL ([\w.]+)", str(safe_error))
    if not trust:
        if needed:
            raise CheckpointError(
                f"{path}: needs pickle to load (it contains {needed.group(1)}, e.g. a PyTorch "
                "Lightning checkpoint) — pass --trust-checkpoint (trust_checkpoint=True) only if "
                "you trust its source"
            ) from safe_error
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({_short(safe_error)}) — "
            "check the file; if it is a pickled checkpoint from a source you trust, pass --trust-checkpoint"
        ) from safe_error
    warnings.warn(
        f"{path}: loading with pickle (weights_only=False) because trust_checkpoint is set; "
        "this can run arbitrary code from the file",
        UserWarning,
        stacklevel=4,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as e:
        raise CheckpointError(
            f"{path}: unpickling needs the Python module {e.name!r} — install it, or re-save "
            "the checkpoint's state_dict with torch.save on a machine that has it"
        ) from e
    except Exception as e:  # arbitrary pickle payloads fail in arbitrary ways
        raise CheckpointError(
            f"{path}: not a readable checkpoint even with pickle ({_short(e)}) — the file is "
            "corrupt or of another kind"
        ) from e


def _short(e: BaseException) -> str:
    """The informative part of an exception as one short line."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch's long weights_only message: keep the cause
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _load_file(path: Path, trust: bool, spec_text: str) -> Encoder:
    obj = _read_checkpoint(path, trust)
    sha = sha256_file(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a checkpoint dict — pass a state_dict, an "
            "engine.pretrain encoder or a Ciga et al. checkpoint"
        )
    if obj.get("format") == ENCODER_FORMAT:
        return _from_histocluster(path, obj, spec_text, sha)
    inner = obj.get("state_dict")
    if isinstance(inner, Mapping):
        if any(str(k).startswith(CIGA_PREFIX) for k in inner):
            return _from_ciga(path, inner, spec_text, sha)
        return _from_plain(path, inner, spec_text, sha)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_plain(path, obj, spec_text, sha)
    keys = ", ".join(str(k) for k in list(obj)[:8])
    raise CheckpointError(
        f"{path}: not a recognised checkpoint (top-level keys: {keys}) — pass a torchvision state_dict, "
        "an engine.pretrain encoder or a Ciga et al. checkpoint"
    )


def _from_histocluster(path: Path, obj: Mapping[str, Any], spec: str, sha: str) -> Encoder:
    version = obj.get("version")
    if version != ENCODER_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: {ENCODER_FORMAT} format version {version!r}, this histocluster reads "
            f"version {ENCODER_FORMAT_VERSION} — use the histocluster version that wrote it"
        )
    absent = [k for k in ("arch", "state_dict", "mean", "std", "input_px") if k not in obj]
    if absent:
        raise CheckpointError(f"{path}: encoder checkpoint lacks {', '.join(absent)} — re-save it")
    arch = obj["arch"]
    if arch not in ARCHS:
        raise CheckpointError(
            f"{path}: unknown arch {arch!r} — this histocluster knows {', '.join(ARCHS)}"
        )
    if not isinstance(obj["state_dict"], Mapping):
        raise CheckpointError(f"{path}: encoder checkpoint's state_dict is not a dict — re-save it")
    mean, std = tuple(obj["mean"]), tuple(obj["std"])
    if len(mean) != 3 or len(std) != 3:
        raise CheckpointError(f"{path}: mean/std need 3 values each — re-save the encoder")
    backbone = build_backbone(arch)
    _load_fitting(backbone, dict(obj["state_dict"]), str(path), arch)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    return Encoder(backbone, arch, mean, std, int(obj["input_px"]), spec, sha, config)


def _from_ciga(path: Path, inner: Mapping[str, Any], spec: str, sha: str) -> Encoder:
    state = {
        (k[len(CIGA_PREFIX) :] if k.startswith(CIGA_PREFIX) else k): v for k, v in inner.items()
    }
    state = {k: v for k, v in state.items() if not _is_fc(k)}
    arch = _infer_arch_of(path, state)
    backbone = build_backbone(arch)
    _load_fitting(backbone, state, str(path), arch)
    return Encoder(backbone, arch, CIGA_MEAN, CIGA_STD, DEFAULT_INPUT_PX, spec, sha)


def _from_plain(path: Path, inner: Mapping[str, Any], spec: str, sha: str) -> Encoder:
    state = {k: v for k, v in _strip_wrappers(inner).items() if not _is_fc(k)}
    arch = _infer_arch_of(path, state)
    backbone = build_backbone(arch)
    _load_fitting(backbone, state, str(path), arch)
    return Encoder(backbone, arch, IMAGENET_MEAN, IMAGENET_STD, DEFAULT_INPUT_PX, spec, sha)


def _infer_arch_of(path: Path, state: Mapping[str, Any]) -> str:
    try:
        return infer_arch(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e} — pass a ResNet-18/34/50/101 checkpoint") from None


def _fit_problems(state: Mapping[str, Any], reference: Mapping[str, torch.Tensor]) -> str:
    """'' when ``state`` fits ``reference`` exactly (num_batches_tracked may be absent), else a summary."""

    def listing(label: str, items: list[str]) -> str:
        more = f" … (+{len(items) - 8} more)" if len(items) > 8 else ""
        return f"{label} ({len(items)}): {', '.join(items[:8])}{more}"

    missing = [k for k in reference if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in reference]
    wrong = [
        f"{k} {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}"
        f"≠{tuple(reference[k].shape)}"
        for k, v in state.items()
        if k in reference
        and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(reference[k].shape))
    ]
    parts = [
        listing(label, items)
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if items
    ]
    return "; ".join(parts)


def _load_fitting(backbone: ResNet, state: dict[str, Any], origin: str, arch: str) -> None:
    """Load ``state`` into ``backbone`` in fp32 or raise CheckpointError listing what does not fit."""
    reference = backbone.state_dict()
    problems = _fit_problems(state, reference)
    if problems:
        raise CheckpointError(
            f"{origin}: keys do not fit {arch} ({problems}) — not a {arch} backbone checkpoint; "
            "nothing was loaded"
        )
    full = {k: state.get(k, v) for k, v in reference.items()}
    full = {k: v.float() if v.is_floating_point() else v for k, v in full.items()}
    backbone.load_state_dict(full, strict=True)
