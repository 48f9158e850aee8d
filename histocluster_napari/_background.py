"""The widget's background threads run at a lower CPU priority than napari's GUI thread.

On a machine with few cores the workers (extraction's encoder, K-means, slide reading) and the
GUI thread take turns on the same cores; at equal priority the GUI thread waits its turn behind
them, and the viewer stutters. Linux keeps a nice value per thread, so a worker thread lowers its
own priority when it starts; the threads and processes it creates (torch's OpenMP pool, the tile
reader's forked workers) inherit it. Elsewhere this is a no-op.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

BACKGROUND_NICE = 10
"""Nice value of the widget's workers: the GUI thread (nice 0) gets about 10x their share of a
contended core (the kernel's weights for nice 0 and 10: 1024 and 110)."""

F = TypeVar("F", bound=Callable[..., Any])


def lower_this_thread(nice: int = BACKGROUND_NICE) -> int | None:
    """Raise the calling thread's nice value to ``nice`` (never lower it); the value it now has,
    or None where per-thread priorities are not available."""
    if not sys.platform.startswith("linux"):
        return None
    tid = threading.get_native_id()
    try:
        now = os.getpriority(os.PRIO_PROCESS, tid)
        if now < nice:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            now = nice
    except OSError:
        return None
    return now


def in_background(func: F) -> F:
    """``func`` lowering its thread's priority first: for callables handed to a worker thread."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        lower_this_thread()
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
