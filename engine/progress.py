"""The one progress protocol of every ``run``: ``progress(stage, done, total)``.

Every long loop of a command calls it at least once a second. It may raise :class:`Cancelled`
(a GUI's Cancel button); the loop then stops at that report, and whatever was finished before it
is kept and consistent (written whole, listed where the command lists its outputs).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["Cancelled", "Progress", "Throttle", "no_progress"]

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``done`` of ``total`` units of ``stage``; may raise ``Cancelled``."""


class Cancelled(Exception):
    """The user asked to stop (raised by a progress callback); what was finished is kept."""


def no_progress(stage: str, done: int, total: int) -> None:
    """The progress callback that reports nothing and never cancels."""


class Throttle:
    """Calls ``progress`` at most every ``interval_s`` seconds, and always at 0 and at the end.

    For loops whose steps are much shorter than a second: reporting every step would cost
    more than the step. Cancellation is still noticed within ``interval_s``.
    """

    def __init__(self, progress: Progress, interval_s: float = 0.2) -> None:
        self.progress = progress
        self.interval_s = float(interval_s)
        self._last = float("-inf")

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0 or done >= total or now - self._last >= self.interval_s:
            self._last = now
            self.progress(stage, done, total)
