"""Encoders: torchvision ResNets, the SimCLR projection head, and ``load_encoder`` for every checkpoint kind.

A spec given to :func:`load_encoder` is one of

- ``resnet18-random`` (or 34/50/101): torchvision weights=None, seeded so a spec always gives the
  same weights; ImageNet normalization, 224 px. Baselines.
- ``resnet18-imagenet`` (or 34/50/101): torchvision's ``DEFAULT`` ImageNet weights, downloaded by
  torchvision into its hub cache; offline this fails with a one-line :class:`CheckpointError`.
- a registry name of :mod:`engine.encoders` (``ciga-resnet18``, ``sample``, ``uni``, ``virchow2``,
  ``h-optimus-0``, ``phikon``, ...): the cached download (fetched on first use when online, see
  ``python -m engine.fetch_weights NAME``), or ``NAME:PATH`` for a local copy in the released
  format (a file, a directory, ``.safetensors``); the transformers are built by :mod:`engine.vit`.
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
import math
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engine import hub, vit
from engine.checkpoint_file import fit_problems, read_checkpoint, strip_wrappers
from engine.encoder_id import EncoderId
from engine.encoders import CIGA, EncoderEntry, registry_names, weights_path
from engine.encoders import entry as registry_entry
from engine.errors import CheckpointError, HistoclusterError, one_line
from engine.files import atomic_write, sha256_file
from engine.resnet import ResNet, resnet
from engine.sample_data import SAMPLE_ENCODER, default_encoder_spec, sample_encoder_path

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
    "resnet18": (resnet, 512),
    "resnet34": (resnet, 512),
    "resnet50": (resnet, 2048),
    "resnet101": (resnet, 2048),
}
"""arch -> (builder of torchvision's network, without torchvision: :mod:`engine.resnet`; width)."""
_IMAGENET_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}
"""arch -> the name of torchvision's weights enum (torchvision imported only to fetch them)."""
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
CIGA_SPEC = CIGA.name
RANDOM_SEED = 0


def feature_dim(arch: str) -> int:
    """Width of the pooled pre-activation features of ``arch``: 512 (resnet18/34) or 2048 (50/101)."""
    return ARCHS[_check_arch(arch)][1]


def build_backbone(arch: str, *, init_weights: bool = True) -> ResNet:
    """torchvision's ResNet with ``weights=None`` and ``fc = Identity`` (built by
    :mod:`engine.resnet`, same keys and seeded weights): (B,3,H,W) -> (B, feature_dim).

    ``init_weights=False``: no re-initialisation, for a meta-device network whose weights are
    all loaded next."""
    model = ARCHS[_check_arch(arch)][0](arch, init_weights=init_weights)
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
    """A backbone (ResNet or registry transformer) with the input size and normalization it expects.

    ``forward``: (B,3,H,W) float, already normalised -> (B, dim) float features (a ResNet's pooled
    pre-activation features, or a transformer's embedding by ``embedding``).
    ``preprocess``: (B,H,W,3) uint8 RGB -> (B,3,input_px,input_px) float normalised.

    ``dim`` defaults to the ResNet width of ``arch``; other backbones pass it. ``source`` says
    where the weights came from (a hub id, a release URL, a file) for provenance.
    """

    def __init__(
        self,
        backbone: nn.Module,
        arch: str,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        input_px: int,
        spec: str,
        sha256: str | None = None,
        config: dict[str, Any] | None = None,
        *,
        dim: int | None = None,
        embedding: str = "pooled",
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch = _check_arch(arch) if dim is None else arch
        self.dim = feature_dim(arch) if dim is None else int(dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.input_px = int(input_px)
        problem = normalisation_problem(self.mean, self.std, self.input_px)
        if problem:
            raise ValueError(problem)
        self.spec = spec
        self.sha256 = sha256
        self.config = dict(config or {})
        self.embedding = embedding
        self.source = source

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
        # torchvision's to_dtype(scale=True), resize(antialias=True) and normalize, op for op
        x = x.permute(0, 3, 1, 2).to(torch.float32).mul_(1.0 / 255)
        if x.shape[-2:] != (self.input_px, self.input_px):
            x = F.interpolate(
                x,
                size=[self.input_px, self.input_px],
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return x.sub(mean).div_(std)

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
            embedding=self.embedding,
            source=self.source,
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
            "embedding": self.embedding,
            "source": self.source,
        }

    def extra_repr(self) -> str:
        return f"arch={self.arch}, dim={self.dim}, input_px={self.input_px}, spec={self.spec!r}"


def named_specs() -> list[str]:
    """Every spec :func:`load_encoder` accepts besides a file path (registry names take ``:PATH``)."""
    ours = [f"{a}-{kind}" for kind in ("random", "imagenet") for a in ARCHS]
    return list(dict.fromkeys(ours + registry_names()))  # resnet18-imagenet is in both


def normalisation_problem(
    mean: tuple[float, ...], std: tuple[float, ...], input_px: int
) -> str | None:
    """Why ``mean``/``std``/``input_px`` cannot normalise tiles, or None when they can."""
    if len(mean) != 3 or len(std) != 3:
        return f"mean/std need 3 values each (got {len(mean)} and {len(std)})"
    if not all(math.isfinite(m) for m in mean):
        return f"mean {list(mean)} is not finite"
    if not all(math.isfinite(s) and s > 0 for s in std):
        return f"std {list(std)} must be positive and finite"
    if not 8 <= input_px <= 8192:
        return f"input_px {input_px} is outside 8..8192"
    return None


def load_encoder(
    spec: str | Path, trust_checkpoint: bool = False, *, blocks: int | None = None
) -> Encoder:
    """Load the encoder a spec names (see the module docstring); returned on CPU, fp32, eval mode.

    ``blocks`` (library-only, for tests): build a registry transformer with this many blocks, so
    a small file in the released layout loads. Raises :class:`CheckpointError` (one line) for
    unknown specs, missing or unreadable files, files that need pickle without
    ``trust_checkpoint``, and state_dicts that do not fit.
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
        name, sep, rest = text.partition(":")
        e = registry_entry(name if sep else text)
        if e is not None:
            return _load_registry(e, rest.strip() if sep else "", trust_checkpoint, blocks).eval()
    path = Path(text).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"{text}: no such checkpoint file and not a known encoder — pass a checkpoint path "
            f"or one of: {', '.join(named_specs())}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint — pass a checkpoint file")
    return _load_file(path, trust_checkpoint, spec_text=str(path.resolve())).eval()


def _load_registry(e: EncoderEntry, path_text: str, trust: bool, blocks: int | None) -> Encoder:
    """A registry entry from ``path_text`` (``name:PATH``), else from the cache / the package,
    downloading a hub or release entry when it is not cached yet."""
    spec = f"{e.name}:{path_text}" if path_text else e.name
    if path_text:
        path = Path(path_text).expanduser()
        if not path.exists():
            raise CheckpointError(
                f"{path_text}: no such file or directory — pass {e.name}:/path/to/{e.filename or 'weights'}"
            )
        spec = f"{e.name}:{path.resolve()}"
    elif e.family == "sample":
        found = sample_encoder_path()
        if found is None:
            raise CheckpointError(
                f"{e.name}: the sample encoder ({SAMPLE_ENCODER} of histocluster_sample_data) is not "
                "installed — reinstall histocluster or pass a checkpoint path"
            )
        path = found
    else:
        cached = weights_path(e)
        if cached is None:
            raise CheckpointError(f"{e.name}: has no weights file — pass {e.name}:/path/to/weights")
        path = cached if cached.is_file() else _download(e, cached)
    if e.family in ("ciga", "sample"):
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory — pass the checkpoint file of {e.name}")
        return _load_file(path, trust, spec_text=spec)
    model, file = vit.load_weights(e, path, blocks=blocks)
    return Encoder(
        model,
        e.arch,
        e.mean,
        e.std,
        e.input_px,
        spec,
        sha256_file(file),
        dim=e.dim,
        embedding=e.embedding,
        source=e.source,
    )


def _download(e: EncoderEntry, cached: Path) -> Path:
    """Fetch an uncached entry on first use; offline -> one line naming the source and the way out."""
    try:
        return hub.download(e)
    except CheckpointError:
        raise
    except HistoclusterError as err:
        raise CheckpointError(
            f"{e.name}: not in the cache ({cached}) and {one_line(err).split(' — ')[0]} — run "
            f"`python -m engine.fetch_weights {e.name}` on a machine with internet, or pass "
            f"--encoder {e.name}:/path/to/{e.filename}"
        ) from err


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
    state = {k: v for k, v in strip_wrappers(backbone.state_dict()).items() if not _is_fc(k)}
    with torch.device("meta"):
        reference = build_backbone(arch, init_weights=False).state_dict()
    problems = fit_problems(state, reference)
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
    return atomic_write(path, lambda f: torch.save(payload, f))


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
    import torchvision.models  # heavy (~2 s: its ops import torch._dynamo): only for its weights

    weights = getattr(torchvision.models, _IMAGENET_WEIGHTS[arch]).DEFAULT
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
    backbone = _load_fitting(state, f"{spec} ({weights.url})", arch)
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


def _load_file(path: Path, trust: bool, spec_text: str) -> Encoder:
    obj = read_checkpoint(path, trust)
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
    try:
        mean = tuple(float(v) for v in obj["mean"])
        std = tuple(float(v) for v in obj["std"])
        input_px = int(obj["input_px"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: mean/std/input_px are not numbers — re-save the encoder"
        ) from e
    problem = normalisation_problem(mean, std, input_px)
    if problem:
        raise CheckpointError(f"{path}: {problem} — re-save the encoder with valid values")
    backbone = _load_fitting(dict(obj["state_dict"]), str(path), arch)
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    return Encoder(backbone, arch, mean, std, input_px, spec, sha, config)


def _from_ciga(path: Path, inner: Mapping[str, Any], spec: str, sha: str) -> Encoder:
    state = {
        (k[len(CIGA_PREFIX) :] if k.startswith(CIGA_PREFIX) else k): v for k, v in inner.items()
    }
    state = {k: v for k, v in state.items() if not _is_fc(k)}
    arch = _infer_arch_of(path, state)
    backbone = _load_fitting(state, str(path), arch)
    return Encoder(backbone, arch, CIGA_MEAN, CIGA_STD, DEFAULT_INPUT_PX, spec, sha)


def _from_plain(path: Path, inner: Mapping[str, Any], spec: str, sha: str) -> Encoder:
    state = {k: v for k, v in strip_wrappers(inner).items() if not _is_fc(k)}
    arch = _infer_arch_of(path, state)
    backbone = _load_fitting(state, str(path), arch)
    return Encoder(backbone, arch, IMAGENET_MEAN, IMAGENET_STD, DEFAULT_INPUT_PX, spec, sha)


def _infer_arch_of(path: Path, state: Mapping[str, Any]) -> str:
    try:
        return infer_arch(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e} — pass a ResNet-18/34/50/101 checkpoint") from None


def _load_fitting(state: dict[str, Any], origin: str, arch: str) -> ResNet:
    """``arch``'s backbone holding ``state`` in fp32, or CheckpointError listing what does not fit.

    Built on the meta device and given the checkpoint's tensors (no random initialisation to
    overwrite, no copy: a third of a small extraction's model load); a ``num_batches_tracked``
    the checkpoint lacks is 0, as in a freshly built network.
    """
    with torch.device("meta"):
        backbone = build_backbone(arch, init_weights=False)
    reference = backbone.state_dict()
    problems = fit_problems(state, reference)
    if problems:
        raise CheckpointError(
            f"{origin}: keys do not fit {arch} ({problems}) — not a {arch} backbone checkpoint; "
            "nothing was loaded"
        )
    full = {
        k: state[k] if k in state else torch.zeros(v.shape, dtype=v.dtype)
        for k, v in reference.items()
    }
    full = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in full.items()}
    backbone.load_state_dict(full, strict=True, assign=True)
    return backbone
