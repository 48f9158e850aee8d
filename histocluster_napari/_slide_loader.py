"""Slides opened for display in a background thread, so switching slides never blocks the UI.

Opening a slide (OpenSlide, a TIFF completeness check) and reading its zoomed-out level take
from tens of milliseconds to seconds; both happen here, in one daemon thread, and the widget
gets a ``loaded(key, Shown | None)`` signal on the GUI thread. The slide asked for now goes
before the ones prefetched. What is loaded is kept (the most recently used ``capacity``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal

from histocluster_napari._slide_layers import open_for_viewing, slide_pyramid, with_overview

Key = tuple[Path, Any]
"""(slide file, level-0 um/px given or None)."""


@dataclass(frozen=True)
class Shown:
    """A slide ready to show: the open slide, whether its um/px is known, its pyramid levels."""

    slide: Any
    mpp_known: bool
    pyramid: list


def load(key: Key) -> Shown | None:
    """Open ``key``'s slide and read its overview level (None when it cannot be read)."""
    path, mpp = key
    slide, mpp_known = open_for_viewing(path, mpp=mpp)
    if slide is None:
        return None
    try:
        return Shown(slide, mpp_known, with_overview(slide_pyramid(slide)))
    except Exception:  # unreadable pixels: show it lazily, the tiles read grey
        return Shown(slide, mpp_known, slide_pyramid(slide))


class SlideLoader(QObject):
    """Loads slides for display in one background thread; ``loaded`` fires on the GUI thread."""

    loaded = Signal(object, object)  # key, Shown | None

    def __init__(self, capacity: int = 32) -> None:
        super().__init__()
        self.capacity = int(capacity)
        self._done: OrderedDict[Key, Shown | None] = OrderedDict()
        self._queue: deque[Key] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def get(self, key: Key) -> Shown | None:
        """The loaded slide (None when not loaded yet or unreadable: see ``is_loaded``)."""
        with self._cond:
            if key in self._done:
                self._done.move_to_end(key)
                return self._done[key]
        return None

    def is_loaded(self, key: Key) -> bool:
        with self._cond:
            return key in self._done

    def request(self, key: Key, urgent: bool = True) -> None:
        """Load ``key`` (first in line when ``urgent``, else after what is queued)."""
        with self._cond:
            if key in self._done:
                return
            if key in self._queue:
                self._queue.remove(key)
            if urgent:
                self._queue.appendleft(key)
            else:
                self._queue.append(key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="histocluster-slides", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def forget(self, key: Key) -> None:
        with self._cond:
            self._done.pop(key, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                key = self._queue.popleft()
            shown = load(key)
            with self._cond:
                self._done[key] = shown
                while len(self._done) > self.capacity:
                    self._done.popitem(last=False)
            try:
                self.loaded.emit(key, shown)
            except RuntimeError:  # the widget (and this QObject) was deleted
                return
