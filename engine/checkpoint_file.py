"""Reading weight files safely: weights-only ``torch.load``, safetensors, and key-fit reports.

Shared by :mod:`engine.models` (ResNets) and :mod:`engine.vit` (registry ViTs). Every failure is a
one-line :class:`~engine.errors.CheckpointError` naming the file and the fix; nothing here runs
pickled code unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.errors import CheckpointError

__all__ = ["fit_problems", "read_checkpoint", "read_weights", "short_reason", "strip_wrappers"]

SAFETENSORS_SUFFIX = ".safetensors"


def read_checkpoint(path: Path, trust: bool) -> Any:
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
            f"{path}: not a readable PyTorch checkpoint ({short_reason(e)}) — the file is corrupt, "
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
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({short_reason(safe_error)}) — "
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
            f"{path}: not a readable checkpoint even with pickle ({short_reason(e)}) — the file is "
            "corrupt or of another kind"
        ) from e


def short_reason(e: BaseException) -> str:
    """The informative part of an exception as one short line."""
    text = str(e)
    if "WeightsUnpickler error:" in text:  # torch's long weights_only message: keep the cause
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    text = " ".join(text.split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def strip_wrappers(state: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes shared by every key."""
    state = dict(state)
    # Both orders occur: DDP around a compiled model and torch.compile around DDP.
    for prefix in ("module.", "_orig_mod.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def fit_problems(state: Mapping[str, Any], reference: Mapping[str, torch.Tensor]) -> str:
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


def read_weights(path: Path, trust: bool = False) -> Any:
    """A ``.safetensors`` file as a state dict, anything else through :func:`read_checkpoint`."""
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path}: not a readable safetensors file ({short_reason(e)}) — the file is "
                "corrupt or truncated (an interrupted download?); download it again"
            ) from e
    return read_checkpoint(path, trust)
