"""A layer's controls made one event-loop pass after the layer, at plugin start.

napari makes a layer's panel in the layer-controls stack inside the layer's insert: about a third
of the insert's time on the GUI thread (an image layer's: 30-55 ms of 100-180). The widget's start
passes insert their hidden layers with the controls held back, and make them in the next pass,
so each half is a pass of its own. Where this napari lacks the parts it needs, nothing is held.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any


class HeldControls:
    """Holds back the controls of the layers inserted inside ``hold()``; ``make()`` makes them."""

    def __init__(self, viewer: Any) -> None:
        self._viewer = weakref.ref(viewer)
        self._held: list[Any] = []
        self._watching = False  # connected to the active-layer event (see _on_active)

    def _controls(self) -> Any:
        """napari's layer-controls stack (``QtLayerControlsContainer``), or None."""
        viewer = self._viewer()
        qt_viewer = getattr(getattr(viewer, "window", None), "_qt_viewer", None)
        controls = getattr(qt_viewer, "controls", None)
        return controls if hasattr(controls, "_add") and hasattr(controls, "widgets") else None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Layers inserted inside get no controls until ``make()``, or until one is made the
        active layer (napari then shows its controls: they are made first)."""
        viewer, controls = self._viewer(), self._controls()
        if viewer is None or controls is None:
            yield
            return
        inserted = viewer.layers.events.inserted
        if not self._watching:
            viewer.layers.selection.events.active.connect(self._on_active, position="first")
            viewer.layers.events.removing.connect(self._on_removing)
            self._watching = True
        inserted.connect(self._record)
        try:
            with inserted.blocker(controls._add):
                yield
        finally:
            inserted.disconnect(self._record)

    def _record(self, event: Any) -> None:
        self._held.append(event.value)

    def _on_active(self, event: Any) -> None:
        if any(layer is event.value for layer in self._held):
            self.make()

    def _on_removing(self, event: Any) -> None:
        """A held layer about to be removed (by the user, or by napari closing the viewer before
        the next pass) gets its controls first: napari's controls stack removes them with the
        layer, and has none to remove otherwise (a KeyError in its ``_remove``)."""
        viewer = self._viewer()
        if viewer is None or not any(held is viewer.layers[event.index] for held in self._held):
            return
        self.make()

    @property
    def pending(self) -> int:
        return len(self._held)

    def make(self) -> None:
        """Make the held layers' controls (those still in the viewer), as napari would have."""
        viewer, controls = self._viewer(), self._controls()
        held, self._held = self._held, []
        if viewer is None or controls is None:
            return
        for layer in held:
            if layer in viewer.layers and layer not in controls.widgets:
                controls._add(SimpleNamespace(value=layer))
