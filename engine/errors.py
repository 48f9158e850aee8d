"""User-facing error types. ``str(error)`` is always one line naming the file and the fix."""

from __future__ import annotations


class HistoclusterError(Exception):
    """Base of every error a command reports as a one-line message instead of a traceback."""


class SlideError(HistoclusterError):
    """A file that cannot be read as a slide: unreadable, truncated, or not an image at all."""


class MissingMppError(SlideError):
    """A slide without resolution metadata; the message says how to supply the microns per pixel."""


class CheckpointError(HistoclusterError):
    """A checkpoint that cannot be loaded as an encoder (bad file, keys that do not fit, untrusted pickle)."""


class StoreError(HistoclusterError):
    """A feature store that is damaged or inconsistent; the message names the damaged path and the fix."""


def one_line(e: BaseException) -> str:
    """An exception's message collapsed onto one line (its type name when the message is empty)."""
    return " ".join(str(e).split()) or type(e).__name__
