"""Parts of the canvas redrawn one per event-loop pass, so no single pass freezes the window.

Changing the shown slide changes several napari layers (the slide's image, its clusters, the
gallery tile's outline); each change costs tens of milliseconds on the GUI thread (napari's
event handlers, re-slicing) and the frame drawn after it as much again (texture uploads on
Mesa's llvmpipe). Done in one slot, they freeze the window for the sum. Here the widget says
which parts are out of date (``want``); each is drawn in its own pass of the event loop, in the
order the parts were declared, each from the widget's state at that moment (so a part wanted
twice is drawn once, with the latest state), and the window repaints and handles input between
them.
"""

from __future__ import annotations

from collections.abc import Callable

from qtpy.QtCore import QTimer

PASS_GAP_MS = 5
"""Between two parts: a 0 ms timer restarted from its own slot ran the parts back to back,
before the window's pending paint and the other timers (measured: no tick of a 10 ms timer
between the image, the frame drawn after it and the clusters)."""


class Redraw:
    """``parts`` (name, draw) in drawing order; ``want(name, ...)`` draws them, one per pass."""

    def __init__(self, parts: list[tuple[str, Callable[[], None]]]) -> None:
        self._parts = dict(parts)
        self._order = [name for name, _ in parts]
        self._wanted: set[str] = set()
        self._timer = QTimer()
        self._timer.setSingleShot(True)
        self._timer.setInterval(PASS_GAP_MS)  # not 0: the event loop ticks (paints) between
        self._timer.timeout.connect(self._next)

    @property
    def pending(self) -> bool:
        """True while some wanted part is not drawn yet."""
        return bool(self._wanted)

    def wanted(self, name: str) -> bool:
        """True while part ``name`` is to be drawn."""
        return name in self._wanted

    def want(self, *names: str) -> None:
        """Draw these parts, from the next pass of the event loop on."""
        unknown = set(names) - set(self._parts)
        if unknown:
            raise KeyError(f"no such part: {', '.join(sorted(unknown))}")
        self._wanted.update(names)
        if not self._timer.isActive():
            self._timer.start()

    def drop(self, *names: str) -> None:
        """Do not draw these parts (what they would draw is gone)."""
        self._wanted.difference_update(names)

    def flush(self) -> None:
        """Draw every wanted part now (the caller needs them drawn before it goes on)."""
        self._timer.stop()
        while self._wanted:
            self._draw_first()

    def stop(self) -> None:
        self._timer.stop()
        self._wanted.clear()

    def _next(self) -> None:
        if self._wanted:
            self._draw_first()
        if self._wanted:
            self._timer.start()

    def _draw_first(self) -> None:
        name = next(n for n in self._order if n in self._wanted)
        self._wanted.discard(name)
        try:
            self._parts[name]()
        except RuntimeError as e:  # the widget or the viewer was closed meanwhile
            self._wanted.clear()
            if "deleted" not in str(e):
                raise
