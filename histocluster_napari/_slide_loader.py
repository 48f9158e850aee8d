"""Slides opened for display in a background thread, so switching slides never blocks the UI.

Opening a slide (OpenSlide, a TIFF completeness check) and reading its zoomed-out level take
from tens of milliseconds to seconds; both happen here, in one daemon thread, and the widget
gets a ``loaded(key, Shown | None)`` signal on the GUI thread. The finer levels are display
levels (``_display_pyramid``): their pixels are read by a ``TileReader``, never by the GUI. The slide asked for now goes
before the ones prefetched. What is loaded is kept (the most recently used ``capacity``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qtpy.QtCore import QObject, Signal

from histocluster_napari._display_pyramid import TileReader, display_pyramid
from histocluster_napari._slide_layers import open_for_viewing
from histocluster_napari._work_queue import WorkQueue

Key = tuple[Path, Any]
"""(slide file, level-0 um/px given or None)."""


@dataclass(frozen=True)
class Shown:
    """A slide ready to show: the open slide, whether its um/px is known, its pyramid levels."""

    slide: Any
    mpp_known: bool
    pyramid: list


def load(key: Key, reader: TileReader) -> Shown | None:
    """Open ``key``'s slide and read its overview level (None when it cannot be read)."""
    path, mpp = key
    slide, mpp_known = open_for_viewing(path, mpp=mpp)
    if slide is None:
        return None
    return Shown(slide, mpp_known, display_pyramid(slide, reader))


class SlideLoader(QObject):
    """Loads slides for display in one background thread; ``loaded`` fires on the GUI thread."""

    loaded = Signal(object, object)  # key, Shown | None

    def __init__(self, reader: TileReader, capacity: int = 32) -> None:
        super().__init__()
        self._work = WorkQueue("histocluster-slides", self._do, self._deliver)
        self._cond = self._work.lock
        self.reader = reader
        self.capacity = int(capacity)
        self._done: OrderedDict[Key, Shown | None] = OrderedDict()

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
            if key not in self._done:
                self._work.put([(key, None)], front=urgent)

    def forget(self, key: Key) -> None:
        with self._cond:
            self._done.pop(key, None)

    def close(self) -> None:
        self._work.close()

    def _do(self, key: Key, _job: None) -> Shown | None:
        shown = load(key, self.reader)
        with self._cond:
            self._done[key] = shown
            while len(self._done) > self.capacity:
                self._done.popitem(last=False)
        return shown

    def _deliver(self, key: Key, shown: Shown | None) -> None:
        if shown is None:
            with self._cond:
                self._done.setdefault(key, None)  # unreadable: known, shown as such
        self.loaded.emit(key, shown)
