"""The glyphs vispy's text visual loads in its first draw, loaded in start passes of their own.

napari gives every Points layer a text visual, drawing a dummy ``''`` when the layer has no text;
vispy lays out any text with the metrics of ``'ÅÉÑŐjgpqy'`` and loads those glyphs at the first
draw (Qt renders each, then a signed distance field is computed on the CPU): about half of the
first outline layer's first frame (60-120 ms of its 150-260). The font is shared by every text
visual of napari's, so the widget loads them once, a few glyphs per event-loop pass.
"""

from __future__ import annotations

from typing import Any

METRIC_GLYPHS = "ÅÉÑŐjgpqy"
"""What vispy's ``_text_to_vbo`` looks up for every text, to align lines (vispy 0.14-0.16)."""


def text_font(viewer: Any, layer: Any) -> Any | None:
    """The font (a ``TextureFont``, indexable by character) of ``layer``'s text visual, or None
    where this napari or vispy does not expose one."""
    canvas = getattr(getattr(viewer.window, "_qt_viewer", None), "canvas", None)
    visual = getattr(canvas, "layer_to_visual", {}).get(layer)
    font = getattr(getattr(getattr(visual, "node", None), "text", None), "_font", None)
    return font if hasattr(font, "__getitem__") else None


def load_glyphs(font: Any | None, chars: str) -> None:
    """Load ``chars`` into ``font`` (each a no-op once loaded)."""
    if font is not None:
        for char in chars:
            font[char]
