"""Keep Triton out of the napari process; imported first by the widget module and the demo.

Triton (pulled in by ``import torchvision`` -> ``torch._dynamo``) carries its own LLVM. Loading
it into a process whose Qt window already holds a Mesa (llvmpipe / radeonsi) OpenGL context
crashes that process with a segfault. The GUI runs its models eagerly and never needs Triton,
so where the GUI process imports torch -- the widget (``_widget``, which napari imports when it
creates the dock widget) and ``python -m histocluster_napari.demo`` -- ``import triton`` is made
to fail cleanly first (torch then reports Triton as unavailable). Nothing else is affected:
importing ``histocluster_napari`` or its reader leaves Triton alone for other plugins.
"""

from __future__ import annotations

import sys

__all__ = ["block_triton"]


def block_triton() -> bool:
    """Make ``import triton`` fail in this process; False when Triton was already imported."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is None
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


block_triton()
