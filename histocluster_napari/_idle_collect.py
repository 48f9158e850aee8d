"""The garbage collector's full pass, run when the widget is idle rather than inside a frame.

A job (extract, cluster, train) leaves new long-lived objects behind (napari events, zarr
metadata, torch modules), which the collector's next full pass scans: 82 ms on the GUI thread,
seen landing in the middle of a gallery click's redraw (47 ms of slot, a frame) and making a
197 ms freeze of it. Run here, in an event-loop pass of its own once the widget has nothing
left to draw, the same pass (53-72 ms measured, 2 slow cores) meets no other work; after it,
CPython's next automatic full pass waits until a quarter as many objects again have survived
(``gc`` docs: ``long_lived_pending > long_lived_total / 4``).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

from qtpy.QtCore import QTimer

IDLE_COLLECT_MS = 700
"""After the job's end, and again while the widget is still drawing: time for its redraw
passes and the frames between them to end first."""


class IdleCollector:
    """``soon()``: one full collection, in a pass of its own once ``idle()`` is True."""

    def __init__(self, idle: Callable[[], bool]) -> None:
        self._idle = idle
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(IDLE_COLLECT_MS)
        self._timer.timeout.connect(self._collect)
        self.collected = 0  # full passes run so far

    def soon(self) -> None:
        """Collect once the widget is idle (a second call before then changes nothing)."""
        if not self._timer.isActive():
            self._timer.start()

    def stop(self) -> None:
        self._timer.stop()

    def _collect(self) -> None:
        try:
            idle = self._idle()
        except RuntimeError:  # the widget was closed meanwhile
            return
        if not idle:
            self._timer.start()
            return
        gc.collect()
        self.collected += 1
