"""The precisions an encoder can run at (names only, no torch: command flags list them).

:func:`engine.encode.resolve_precision` turns ``auto`` into one of :data:`Precision` on a device.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["PRECISIONS", "Precision"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
