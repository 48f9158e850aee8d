"""The sample slide and the sample encoder, found where an install put them.

They ship as package data of ``histocluster_sample_data`` (the repository's ``sample_data/``
folder, mapped by ``pyproject.toml``), so a wheel or ``pip install .`` finds them through
:mod:`importlib.resources`, not through a path beside the checkout. A source tree that was never
installed falls back to ``sample_data/`` beside ``engine/``. Every function returns ``None`` when
the file is absent; callers say what is missing.
"""

from __future__ import annotations

import importlib.resources
import warnings
from pathlib import Path

__all__ = [
    "FALLBACK_SPEC",
    "SAMPLE_ENCODER",
    "SAMPLE_PACKAGE",
    "SAMPLE_SLIDE",
    "default_encoder_spec",
    "sample_data_dir",
    "sample_encoder_path",
    "sample_file",
    "sample_slide_path",
]

SAMPLE_PACKAGE = "histocluster_sample_data"
SAMPLE_SLIDE = "sample_slide.tiff"
SAMPLE_ENCODER = "sample_encoder.pt"
_SOURCE_TREE = Path(__file__).resolve().parent.parent / "sample_data"


def sample_data_dir() -> Path | None:
    """The folder holding the sample files: the installed package's, else the source tree's."""
    try:
        root = importlib.resources.files(SAMPLE_PACKAGE)
    except ModuleNotFoundError:
        root = None
    if root is not None:
        path = Path(str(root))
        if path.is_dir():  # a real directory (not inside a zip): files in it have stable paths
            return path
    return _SOURCE_TREE if _SOURCE_TREE.is_dir() else None


def sample_file(name: str) -> Path | None:
    """``name`` inside :func:`sample_data_dir`, or None when it is not there."""
    folder = sample_data_dir()
    if folder is None:
        return None
    path = folder / name
    return path if path.is_file() else None


def sample_slide_path() -> Path | None:
    """The synthetic H&E sample slide (``sample_slide.tiff``), or None when it is not installed."""
    return sample_file(SAMPLE_SLIDE)


def sample_encoder_path() -> Path | None:
    """The shipped SimCLR ResNet-18 (``sample_encoder.pt``), or None when it is not installed."""
    return sample_file(SAMPLE_ENCODER)


FALLBACK_SPEC = "resnet18-random"


def default_encoder_spec() -> str:
    """The installed sample encoder's path; ``resnet18-random`` with a warning when it is missing."""
    sample = sample_encoder_path()
    if sample is not None:
        return str(sample)
    warnings.warn(
        f"the sample encoder ({SAMPLE_ENCODER} of the histocluster_sample_data package) is not "
        f"installed — using {FALLBACK_SPEC} (random weights); reinstall histocluster or pass --encoder",
        UserWarning,
        stacklevel=2,
    )
    return FALLBACK_SPEC
