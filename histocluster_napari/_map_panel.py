"""The map of the cohort's tiles in a second napari viewer, linked to the slide viewer.

A second viewer rather than a dock with a bare canvas: the map gets napari's own layer list,
camera, layer controls and shape tools (the lasso is a Shapes polygon drawn with napari's
polygon tool), and the slide viewer keeps its canvas to itself. It holds the mosaic (Image),
each cell's majority cluster (Labels) and every tile as a point coloured by its cluster (or by
its predicted class once a classifier exists). A click on the map jumps the slide viewer to the
nearest tile (opening its slide); "Assign lasso" gives every tile inside the drawn polygons a
class (or excludes them): per-tile overrides of the curation, redrawn on the slide at once.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
from magicgui.widgets import ComboBox, Container, PushButton

from histocluster_napari import _map
from histocluster_napari._canvas_click import on_click
from histocluster_napari._classifier_panel import hex_rgba
from histocluster_napari._overlay import cluster_colors, labels_colormap

EXCLUDE = "(exclude)"
MAP_LAYERS = ("mosaic", "cell clusters", "tiles", "cursor tile", "lasso")


class MapPanel(Container):
    """Open map / lasso class / Assign lasso, over the widget's shown run."""

    def __init__(self, widget: Any) -> None:
        """``widget``: the ``HistoClusterWidget`` this panel belongs to."""
        super().__init__(labels=True)
        self._w = widget
        self.map: _map.MapView | None = None
        self.viewer: Any = None
        self.open_button = PushButton(
            text="Open map",
            tooltip="A 2-D map of the run's tiles (engine.embed) in a second viewer",
        )
        self.lasso_class = ComboBox(label="lasso class", choices=self._classes)
        self.lasso_button = PushButton(
            text="Assign lasso",
            tooltip="Give the tiles inside the polygons drawn on the map's 'lasso' layer this class",
        )
        self.extend(
            [
                Container(
                    layout="horizontal", widgets=[self.open_button, self.lasso_button], labels=False
                ),
                self.lasso_class,
            ]
        )
        self.native.setContentsMargins(0, 0, 0, 0)
        self.open_button.changed.connect(lambda _: self.open_map())
        self.lasso_button.changed.connect(lambda _: self.assign_lasso())

    def _classes(self, _widget: Any = None) -> list[str]:
        view = self._w.view
        return [*([] if view is None else view.curation.classes()), EXCLUDE]

    # ------------------------------------------------------------------ open

    def open_map(self, viewer: Any = None, method: str | None = None) -> Any:
        """Make (or reuse) the run's map in the widget's worker, then show it in ``viewer``
        (default: a new napari viewer, made once)."""
        w = self._w
        if w.view is None:
            w._fail("Open map: cluster first")
            return None
        if w.busy:
            return None
        if viewer is not None:
            self.viewer = viewer
        w.status.value = "Making the map of the run's tiles…"
        view = w.view
        return w._start(_map.make_map, view.store_path, view.run, method, on_done=self._show)

    def _show(self, m: _map.MapView) -> None:
        import napari

        self.map = m
        if self.viewer is None:
            self.viewer = napari.Viewer(title=f"HistoCluster map — {m.run}")
        v = self.viewer
        for name in MAP_LAYERS:
            if name in v.layers:
                v.layers.remove(name)
        v.add_image(m.mosaic, name="mosaic", rgb=True)
        k = self._w.view.k if self._w.view is not None else int(m.tile_map.labels.max()) + 1
        cells = (m.grid.cluster.astype(np.int32) + 1).clip(0).astype(np.uint16)
        t = (m.cell_px - 1) / 2
        layer = v.add_labels(
            cells,
            name="cell clusters",
            scale=(m.cell_px, m.cell_px),
            translate=(t, t),
            opacity=0.25,
        )
        layer.colormap = labels_colormap(cluster_colors(k))
        layer.editable = False
        v.add_points(
            m.points - 0.5, name="tiles", size=max(2, m.cell_px // 2), face_color=self._colours(),
            border_width=0,
        )  # fmt: skip
        v.add_points(
            np.zeros((0, 2)), name="cursor tile", size=m.cell_px, face_color="transparent",
            border_color="cyan", border_width=0.2,
        )  # fmt: skip
        v.add_shapes(name="lasso", edge_color="yellow", face_color=[1, 1, 0, 0.15], edge_width=2)
        v.layers.selection.active = v.layers["lasso"]
        if self.on_mouse not in v.mouse_drag_callbacks:
            v.mouse_drag_callbacks.append(self.on_mouse)
            v.mouse_move_callbacks.append(self.on_map_move)
            _SlideHover.attach(self, self._w._viewer)
        self.lasso_class.reset_choices()
        self._w.status.value = (
            f"Map of {len(m.tile_map)} tiles ({m.method}). Click a point to see its tile; draw "
            "polygons on 'lasso', choose a class, then Assign lasso."
        )

    def _colours(self) -> np.ndarray:
        """(N, 4) RGBA of each tile's point: its predicted class, else its cluster."""
        m, w = self.map, self._w
        pred = w.classifier.prediction
        tm = m.tile_map
        if pred is not None and pred.colours:
            palette = np.stack([hex_rgba(c) for c in pred.colours])
            out = np.tile(np.array([0.5, 0.5, 0.5, 1.0], np.float32), (len(tm), 1))
            for i, sid in enumerate(tm.slide_ids):
                sel = tm.slide == i
                if sid in pred.classes_map:
                    cls = pred.classes_map[sid][tm.rows[sel], tm.cols[sel]]
                    out[sel] = np.where((cls >= 0)[:, None], palette[cls.clip(0)], out[sel])
            return out
        colours = cluster_colors(max(int(tm.labels.max()) + 1, 1))
        return colours[tm.labels.clip(0)]

    # ------------------------------------------------------------------ interaction

    def on_mouse(self, viewer: Any, event: Any) -> Any:
        """A click (no drag) on the map in pan/zoom mode jumps to the nearest tile."""
        yield from on_click(viewer, event, self.click_at)

    def on_map_move(self, viewer: Any, event: Any) -> None:
        self.hover_at(tuple(event.position[-2:]))

    def hover_at(self, world_rc: tuple[float, float]) -> tuple[str, int, int] | None:
        """Name the slide and tile under a map point (the map viewer's text overlay)."""
        tile = (
            None if self.map is None else self.map.tile_at((world_rc[0] + 0.5, world_rc[1] + 0.5))
        )
        if self.viewer is not None:
            overlay = self.text_overlay
            overlay.text = "" if tile is None else f"{tile[0]}, tile ({tile[1]}, {tile[2]})"
            overlay.visible = tile is not None
        return tile

    @property
    def text_overlay(self) -> Any:
        """The map viewer's text overlay (``viewer.canvas.overlays.text`` from napari 0.9)."""
        canvas = getattr(self.viewer, "canvas", None)
        overlays = getattr(canvas, "overlays", None)
        return overlays.text if overlays is not None else self.viewer.text_overlay

    def highlight(self, sid: str, row: int, col: int) -> int | None:
        """Ring the map point of slide ``sid``'s tile (row, col) (the tile under the slide cursor)."""
        if self.map is None or self.viewer is None or "cursor tile" not in self.viewer.layers:
            return None
        i = self.map.tile_map.index_of(sid, row, col)
        layer = self.viewer.layers["cursor tile"]
        layer.data = np.zeros((0, 2)) if i is None else self.map.points[i : i + 1] - 0.5
        return i

    def click_at(self, world_rc: tuple[float, float]) -> tuple[str, int, int] | None:
        """Jump the slide viewer to the tile nearest a map point (world = mosaic pixels)."""
        if self.map is None:
            return None
        tile = self.map.tile_at((world_rc[0] + 0.5, world_rc[1] + 0.5))
        if tile is None:
            return None
        self._w.jump_to_tile(*tile)
        return tile

    def assign_lasso(self) -> int:
        """Override every tile inside the map's lasso polygons; the polygons are then cleared."""
        w = self._w
        if self.map is None or w.view is None or self.viewer is None:
            w._fail("Assign lasso: open the map first")
            return 0
        layer = self.viewer.layers["lasso"] if "lasso" in self.viewer.layers else None
        if layer is None or not len(layer.data):
            w._fail("Assign lasso: draw a polygon on the map's 'lasso' layer first")
            return 0
        name = self.lasso_class.value
        name = None if name in (None, EXCLUDE) else name
        n = sum(self.map.lasso(w.view.curation, np.asarray(p) + 0.5, name) for p in layer.data)
        layer.data = []
        w.status.value = f"{n} tiles of the lasso " + (
            f"moved to {name!r}" if name else "excluded from export"
        )
        return n


__all__ = ["MapPanel"]


class _SlideHover:
    """The slide viewer's mouse-move hook: highlights the tile under the cursor on the map.
    Holds the panel weakly and removes itself once the panel is gone."""

    def __init__(self, panel: MapPanel, viewer: Any) -> None:
        self._panel = weakref.ref(panel)
        self._viewer = weakref.ref(viewer)

    @classmethod
    def attach(cls, panel: MapPanel, viewer: Any) -> None:
        viewer.mouse_move_callbacks.append(cls(panel, viewer))

    def __call__(self, viewer: Any, event: Any) -> None:
        panel = self._panel()
        if panel is None:
            viewer.mouse_move_callbacks.remove(self)
            return
        w = panel._w
        tile = w.tile_at(tuple(event.position[-2:]))
        if tile is not None and w._current is not None:
            panel.highlight(w._current, *tile)
