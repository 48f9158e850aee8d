"""A click on a napari canvas, told from a drag: the one mouse-callback body of both viewers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def on_click(viewer: Any, event: Any, act: Callable[[tuple[float, float]], Any]) -> Iterator[None]:
    """Body of a napari mouse-drag callback: ``act(world_yx)`` when the left button is pressed
    and released without dragging (no modifier keys) while the active layer is in pan/zoom
    mode (not while the user paints or draws)."""
    if event.type != "mouse_press" or event.button != 1 or event.modifiers:
        return
    active = viewer.layers.selection.active
    if active is not None and getattr(active, "mode", "pan_zoom") != "pan_zoom":
        return
    start = np.asarray(event.position)
    dragged = False
    yield
    while event.type == "mouse_move":
        dragged = True
        yield
    if not dragged or np.allclose(start, event.position):
        act(tuple(event.position[-2:]))
