"""Registry transformers (timm and Hugging Face ``transformers``): build, load weights, embed.

:class:`TokenEncoder` turns a model's final token sequence (B, N, C) into one tile embedding by the
entry's rule (``cls``: (B, C); ``cls+mean_patch``: (B, 2C), register tokens excluded). Weights come
from the released file (``pytorch_model.bin``, ``.safetensors``, or a ``transformers`` directory),
always weights-only, and must fit the architecture key for key.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoint_file import fit_problems, read_weights, strip_wrappers
from engine.encoders import EncoderEntry
from engine.errors import CheckpointError, one_line

__all__ = ["TokenEncoder", "build_model", "embed_tokens", "load_weights", "weights_file"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Heads a released file may carry that a feature extractor does not use (dropped, not loaded).
_UNUSED_PREFIXES = ("head.", "pooler.", "fc_norm.")
_HF_EXTRA = 'pip install "histocluster[hf]"'


def embed_tokens(tokens: torch.Tensor, rule: str, prefix_tokens: int) -> torch.Tensor:
    """(B, N, C) tokens (class token first, then ``prefix_tokens - 1`` registers, then patches) ->
    (B, C) for ``cls``, (B, 2C) for ``cls+mean_patch``."""
    if rule == "cls":
        return tokens[:, 0]
    if rule == "cls+mean_patch":
        return torch.cat([tokens[:, 0], tokens[:, prefix_tokens:].mean(dim=1)], dim=-1)
    raise ValueError(f"unknown embedding rule {rule!r}")


class TokenEncoder(nn.Module):
    """A transformer plus its embedding rule: (B,3,H,W) normalised float -> (B, dim)."""

    def __init__(self, model: nn.Module, family: str, embedding: str, prefix_tokens: int) -> None:
        super().__init__()
        self.model = model
        self.family = family
        self.embedding = embedding
        self.prefix_tokens = int(prefix_tokens)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) -> (B, N, C): the final, normed token sequence."""
        if self.family == "timm":
            return self.model.forward_features(x)
        return self.model(pixel_values=x).last_hidden_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return embed_tokens(self.tokens(x), self.embedding, self.prefix_tokens)


def _resolve(value: Any) -> Any:
    """``"timm.layers.SwiGLUPacked"`` -> the class; other values unchanged."""
    if isinstance(value, str) and value.startswith(("timm.", "torch.")) and "." in value:
        module, _, name = value.rpartition(".")
        return getattr(importlib.import_module(module), name)
    return value


def _import_transformers(e: EncoderEntry) -> Any:
    try:
        import transformers
    except ImportError as err:
        raise CheckpointError(
            f"{e.name}: needs the Hugging Face transformers package — {_HF_EXTRA}"
        ) from err
    return transformers


def build_model(
    e: EncoderEntry,
    *,
    blocks: int | None = None,
    config: Mapping[str, Any] | None = None,
    meta: bool = False,
) -> TokenEncoder:
    """The entry's architecture with random weights (``blocks``: fewer transformer blocks, for tests
    of the released layout; ``config``: a ``transformers`` directory's config.json values;
    ``meta``: timm only, parameters on the meta device — shapes without memory or init time, to be
    filled by ``load_state_dict(..., assign=True)``)."""
    if e.family == "timm":
        import timm

        kwargs = {k: _resolve(v) for k, v in e.kwargs.items()}
        if blocks is not None:
            kwargs["depth"] = int(blocks)
        if meta:
            with torch.device("meta"):
                model = timm.create_model(e.arch, pretrained=False, weight_init="skip", **kwargs)
        else:
            model = timm.create_model(e.arch, pretrained=False, **kwargs)
        return TokenEncoder(model, "timm", e.embedding, getattr(model, "num_prefix_tokens", 1))
    if e.family == "transformers":
        transformers = _import_transformers(e)
        values = dict(config) if config is not None else dict(e.kwargs)
        if blocks is not None:
            values["num_hidden_layers"] = int(blocks)
        config_cls = getattr(transformers, e.arch.replace("Model", "Config"))
        model_cls = getattr(transformers, e.arch)
        known = config_cls().to_dict()
        cfg = config_cls(**{k: v for k, v in values.items() if k in known})
        model = model_cls(cfg, add_pooling_layer=False) if e.arch == "ViTModel" else model_cls(cfg)
        return TokenEncoder(model, "transformers", e.embedding, 1)
    raise ValueError(f"{e.name}: family {e.family!r} is not a transformer")


def weights_file(e: EncoderEntry, path: Path) -> Path:
    """The weights file at ``path``: the file itself, or the released file inside a directory."""
    if path.is_file():
        return path
    if path.is_dir():
        for name in (e.filename, *_WEIGHT_FILES):
            if name and (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(found) == 1:
            return path / found[0]
        raise CheckpointError(
            f"{path}: no weights file for {e.name} in this directory (looked for "
            f"{', '.join(dict.fromkeys(n for n in (e.filename, *_WEIGHT_FILES) if n))}) — pass "
            f"--encoder {e.name}:/path/to/{e.filename}"
        )
    raise CheckpointError(f"{path}: no such file or directory — pass the path of {e.filename}")


def _state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "teacher"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and not isinstance(inner, torch.Tensor):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: not a state dict of tensors ({type(obj).__name__}) — pass the released "
            "weights file"
        )
    return strip_wrappers(obj)


def _load_transformers(e: EncoderEntry, file: Path, blocks: int | None) -> TokenEncoder:
    """``from_pretrained`` on a folder holding the file (released keys are converted by
    transformers itself); every missing / unexpected / mis-shaped key is an error."""
    transformers = _import_transformers(e)
    config_json = file.parent / "config.json"
    config_cls = getattr(transformers, e.arch.replace("Model", "Config"))
    if config_json.is_file():
        try:
            values = json.loads(config_json.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(
                f"{config_json}: not readable JSON ({err}) — re-download it"
            ) from err
    else:
        values = dict(e.kwargs)
    if blocks is not None:
        values["num_hidden_layers"] = int(blocks)
    known = config_cls().to_dict()
    cfg = config_cls(**{k: v for k, v in values.items() if k in known})
    name = "model.safetensors" if file.suffix == ".safetensors" else "pytorch_model.bin"
    model_cls = getattr(transformers, e.arch)
    extra = {"add_pooling_layer": False} if e.arch == "ViTModel" else {}
    with tempfile.TemporaryDirectory(prefix="histocluster-hf-") as tmp:
        (Path(tmp) / name).symlink_to(file.resolve())
        cfg.save_pretrained(tmp)
        try:
            model, info = model_cls.from_pretrained(
                tmp, config=cfg, output_loading_info=True, **extra
            )
        except (OSError, ValueError, RuntimeError, KeyError) as err:
            raise CheckpointError(
                f"{file}: cannot be loaded as {e.name} ({e.arch}) ({one_line(err)[:200]}) — pass "
                "the released weights file"
            ) from err
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(_UNUSED_PREFIXES)]
    wrong = [f"{k} {a}≠{b}" for k, a, b in info.get("mismatched_keys", [])]
    parts = [
        f"{label} ({len(items)}): {', '.join(map(str, items[:8]))}"
        for label, items in (
            ("missing", list(info.get("missing_keys", []))),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        )
        if items
    ]
    if parts:
        raise CheckpointError(
            f"{file}: keys do not fit {e.name} ({e.arch}) ({'; '.join(parts)}) — not the released "
            f"{e.name} weights; nothing was used"
        )
    return TokenEncoder(model.float().eval(), "transformers", e.embedding, 1)


def load_weights(
    e: EncoderEntry, path: Path, *, blocks: int | None = None
) -> tuple[TokenEncoder, Path]:
    """Build the entry and load the weights at ``path`` (file or directory) into it, fp32, eval.

    Returns the encoder and the weights file read. Raises :class:`CheckpointError` listing every
    missing, unexpected and mis-shaped key when the file does not fit (nothing is loaded then).
    """
    file = weights_file(e, path)
    if e.family == "transformers":
        return _load_transformers(e, file, blocks), file
    # Built on the meta device: a ViT-g's random init would take longer than reading its weights.
    model = build_model(e, blocks=blocks, meta=True)
    state = _state_dict(read_weights(file), file)
    target = model.model
    reference = target.state_dict()
    state = {k: v for k, v in state.items() if k in reference or not k.startswith(_UNUSED_PREFIXES)}
    problems = fit_problems(state, reference)
    if problems:
        raise CheckpointError(
            f"{file}: keys do not fit {e.name} ({e.arch}) ({problems}) — not the released "
            f"{e.name} weights; nothing was loaded"
        )
    full = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state.items()}
    target.load_state_dict(full, strict=True, assign=True)
    left = [n for n, t in (*target.named_parameters(), *target.named_buffers()) if t.is_meta]
    if left:  # a non-persistent buffer the file cannot hold: build it for real, then load
        model = build_model(e, blocks=blocks)
        model.model.load_state_dict(full, strict=True)
    return model.float().eval(), file
