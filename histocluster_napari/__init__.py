"""napari plugin of histocluster: a thin GUI over the ``engine`` package."""

import sys

# Triton (pulled in by torchvision -> torch._dynamo) carries its own LLVM; loading it into a
# process whose Qt window already holds a Mesa (llvmpipe / radeonsi) OpenGL context crashes
# the process with a segfault. The GUI runs its models eagerly and never needs Triton, so we
# make ``import triton`` fail cleanly here (torch then reports it as unavailable).
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]
