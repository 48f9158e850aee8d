"""The HistoCluster dock widget: pick a slide, click Cluster, curate the clusters, export them.

A thin layer over ``engine``: every piece of work (``_session``) runs in a napari
``thread_worker`` so the UI stays responsive; the widget only gathers inputs, shows progress,
draws the result as a Labels layer on the tile grid (see ``_overlay``) and turns errors into
notifications that say what to do.
"""

from __future__ import annotations

# First, before anything imports torch: keep Triton out of the GUI process (see the module).
from histocluster_napari import _triton_guard  # noqa: F401

# isort: split

import threading
import traceback
import weakref
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.layers import Image, Labels, Shapes
from napari.utils import progress as napari_progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QSizePolicy
from superqt.utils import create_worker

from engine.errors import HistoclusterError
from engine.models import default_encoder_spec
from engine.progress import Cancelled
from engine.tiling import Tiling
from engine.tissue import TISSUE_METHODS
from histocluster_napari import _session
from histocluster_napari._cluster_table import ClusterTable
from histocluster_napari._overlay import (
    cluster_colors,
    label_image,
    labels_colormap,
)
from histocluster_napari._slide_layers import METADATA_KEY
from histocluster_napari._store_layers import CLUSTERS_SUFFIX

if TYPE_CHECKING:
    import napari

SIMILAR_SUFFIX = " similar"
ENCODER_FILTER = "Encoder checkpoints (*.pt *.pth *.ckpt *.tar *.bin);;All files (*)"
RECLUSTER_DELAY_MS = 400
OVERLAY_OPACITY = 0.6


class SpecEdit(FileEdit):
    """A file picker whose text may also be a name (``resnet18-random``): the value is the text."""

    @property
    def value(self) -> str:  # type: ignore[override]
        return str(self.line_edit.value).strip()

    @value.setter
    def value(self, value: str | Path) -> None:
        self.line_edit.value = str(value)


class _Bridge(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connection)."""

    event = Signal(object)  # ("progress", stage, done, total) | ("done", result) | ("error", exc)


class HistoClusterWidget(Container):
    """Dock widget: slide, encoder, tiling, k and store in; clusters, selection and export out."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        self._viewer = viewer
        self._worker: Any = None
        self._cancel = threading.Event()
        self._pbar: napari_progress | None = None
        self._stage = ""
        self._view: _session.ClusterView | None = None
        self._query_tile: tuple[int, int] | None = None
        self._bridge = _Bridge()
        self._bridge.event.connect(self._on_event)
        self._on_done: Any = None
        self._events: deque[tuple] = deque()
        self._handling = False
        self._recluster_timer = QTimer()
        self._recluster_timer.setSingleShot(True)
        self._recluster_timer.timeout.connect(self._recluster)

        # ---- inputs
        self.slide = ComboBox(label="slide", choices=self._slide_choices, nullable=True)
        self.slide_mpp = FloatSpinBox(
            label="slide um/px",
            value=0.0,
            min=0.0,
            max=100.0,
            step=0.001,
            tooltip="Micrometres per pixel of the slide's full resolution. Needed only when the "
            "file has no resolution metadata; 0 = from the file.",
            visible=False,
        )
        self.encoder = SpecEdit(
            label="encoder",
            mode="r",
            filter=ENCODER_FILTER,
            value=default_encoder_spec(),
            tooltip="A checkpoint file load_encoder accepts (engine.pretrain's encoder.pt, the "
            "paper's released ResNet-18, a torchvision state_dict) or a name such as "
            "resnet18-random.",
        )
        self.tile_px = SpinBox(label="tile px", value=224, min=16, max=4096, step=16)
        self.target_mpp = FloatSpinBox(
            label="um/px",
            value=0.5,
            min=0.05,
            max=64.0,
            step=0.25,
            tooltip="Resolution of the tiles.",
        )
        self.tissue_method = ComboBox(
            label="tissue",
            choices=list(TISSUE_METHODS),
            value="otsu",
            tooltip="How tissue is told from background on the slide's thumbnail.",
        )
        self.min_tissue = FloatSpinBox(
            label="min tissue",
            value=0.5,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="A tile is encoded and clustered when at least this share of it is tissue.",
        )
        self.k = SpinBox(label="k", value=8, min=2, max=64, tooltip="Number of clusters.")
        self.store = FileEdit(
            label="feature store",
            mode="w",
            filter="Feature stores (*.zarr)",
            value="",
            tooltip="Where the features are kept. Empty: a cache directory keyed by slide, "
            "encoder and tiling, so clicking Cluster again never re-encodes.",
        )
        self.cluster_button = PushButton(text="Cluster")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self.status = Label(label="", value="Open a slide, then click Cluster.")
        # ---- results
        self.table = ClusterTable()
        self.show_selected_only = CheckBox(text="Show selected only")
        self.find_similar_button = PushButton(
            text="Find similar (Shift-F)",
            tooltip="Mark the tiles most similar to the last clicked tile (Shift-F: the tile "
            "under the cursor).",
        )
        self.n_similar = SpinBox(label="similar tiles", value=20, min=1, max=1000)
        self.export_dir = FileEdit(label="export to", mode="d", value="")
        self.export_button = PushButton(text="Export selected")

        run_box = Container(
            widgets=[
                Container(
                    layout="horizontal",
                    widgets=[self.cluster_button, self.cancel_button],
                    labels=False,
                ),
                self.progress_bar,
                self.status,
            ],
            labels=False,
        )
        self._actions = Container(
            widgets=[
                self.show_selected_only,
                self.n_similar,
                self.find_similar_button,
                self.export_dir,
                self.export_button,
            ],
            labels=True,
        )
        self.extend(
            [
                self.slide,
                self.slide_mpp,
                self.encoder,
                self.tile_px,
                self.target_mpp,
                self.tissue_method,
                self.min_tissue,
                self.k,
                self.store,
            ]
        )
        self.native.layout().addWidget(run_box.native)
        self._run_box = run_box
        self.native.layout().addWidget(self.table)
        self.native.layout().addWidget(self._actions.native)
        self._actions.native.setContentsMargins(0, 0, 0, 0)
        self.store.line_edit.native.setPlaceholderText("(cache, keyed by slide and encoder)")
        self.status.native.setWordWrap(True)
        lines = self.status.native.fontMetrics().lineSpacing()
        self.status.native.setMinimumHeight(3 * lines + 4)
        self.status.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.status.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.status.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.min_width = 420

        # ---- wiring
        self.cluster_button.changed.connect(self.run_cluster)
        self.cancel_button.changed.connect(self.cancel)
        self.slide.changed.connect(self._on_slide_changed)
        self.slide_mpp.changed.connect(self._on_slide_mpp_changed)
        self.k.changed.connect(self._on_k_changed)
        for w in (
            self.slide,
            self.slide_mpp,
            self.encoder,
            self.tile_px,
            self.target_mpp,
            self.tissue_method,
            self.min_tissue,
        ):
            w.changed.connect(self._update_store_hint)
        self.table.selection_changed.connect(self._on_selection_changed)
        self.show_selected_only.changed.connect(lambda _: self._refresh_colors())
        self.find_similar_button.changed.connect(lambda _: self.find_similar())
        self.export_button.changed.connect(lambda _: self.export_selected())
        self.table.itemChanged.connect(lambda _item: self._update_layer_features())
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._on_layers_changed)
        self._viewer_hooks = _ViewerHooks(self, viewer)
        self._on_layers_changed()
        self._update_store_hint()

    # ================================================================== inputs

    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Image) and self._layer_path(layer) is not None
        ]

    @staticmethod
    def _layer_path(layer: Image) -> Path | None:
        meta = layer.metadata.get(METADATA_KEY, {})
        if "slide_path" in meta:
            return Path(meta["slide_path"])
        path = getattr(layer.source, "path", None)
        return Path(path) if path else None

    def _on_layers_changed(self, _event: Any = None) -> None:
        current = self.slide.value
        self.slide.reset_choices()
        if current is None and self.slide.choices:
            self.slide.value = self.slide.choices[-1]
        self._on_slide_changed()

    def _slide_layer(self) -> Image | None:
        layer = self.slide.value
        return layer if layer is not None and layer in self._viewer.layers else None

    def _mpp_known(self, layer: Image) -> bool:
        return bool(layer.metadata.get(METADATA_KEY, {}).get("mpp_known", False))

    def _on_slide_changed(self, _value: Any = None) -> None:
        layer = self._slide_layer()
        missing = layer is not None and not self._mpp_known(layer)
        self.slide_mpp.visible = missing or self.slide_mpp.value > 0
        if missing and self.slide_mpp.value <= 0:
            self.status.value = (
                f"{layer.name}: the file has no resolution — enter its um/px in 'slide um/px'."
            )

    def _on_slide_mpp_changed(self, value: float) -> None:
        layer = self._slide_layer()
        if layer is None or value <= 0:
            return
        layer.scale = (value, value)
        meta = dict(layer.metadata.get(METADATA_KEY, {}))
        meta.update({"mpp": (value, value), "mpp_given": True})
        layer.metadata = {**layer.metadata, METADATA_KEY: meta}
        if self._view is not None and self._view.slide_path == self._layer_path(layer):
            self._view = None  # the grid changes with the resolution: cluster again
        self.status.value = f"{layer.name}: {value:g} um/px. Click Cluster."

    def _update_store_hint(self, _value: Any = None) -> None:
        """Show where the default (cache) store of the current inputs is."""
        try:
            path = self.job().store_path()
        except HistoclusterError:
            return
        edit = self.store.line_edit.native
        edit.setPlaceholderText(f"cache: {path.name}")
        edit.setToolTip(f"empty = {path}")

    def job(self) -> _session.ClusterJob:
        """The clustering the inputs describe (raises HistoclusterError when they are incomplete)."""
        layer = self._slide_layer()
        if layer is None:
            raise HistoclusterError(
                "no slide — open a whole-slide image (File > Open, or drag it onto the viewer) "
                "and pick it under 'slide'"
            )
        path = self._layer_path(layer)
        assert path is not None
        mpp: float | None = self.slide_mpp.value if self.slide_mpp.value > 0 else None
        if mpp is None and not self._mpp_known(layer):
            self.slide_mpp.visible = True
            raise HistoclusterError(
                f"{path}: no resolution (microns per pixel) in the metadata — enter the slide's "
                "um/px in the 'slide um/px' field of the HistoCluster widget"
            )
        encoder = self.encoder.value or default_encoder_spec()
        store_text = self.store.line_edit.value.strip()
        return _session.ClusterJob(
            slide_path=path,
            slide_mpp=mpp,
            encoder=encoder,
            tiling=self.tiling(),
            k=int(self.k.value),
            store=Path(store_text).expanduser() if store_text else None,
        )

    def tiling(self) -> Tiling:
        """The tiling the inputs describe (tile size, um/px, tissue method, minimum tissue)."""
        return Tiling(
            tile_px=int(self.tile_px.value),
            target_mpp=float(self.target_mpp.value),
            tissue_method=self.tissue_method.value,
            min_tissue=float(self.min_tissue.value),
        )

    # ================================================================== running

    @property
    def busy(self) -> bool:
        """True while a worker runs."""
        return self._worker is not None

    def run_cluster(self, _value: Any = None) -> Any:
        """Extract features when missing, then K-means, in a worker. Returns the worker (or None)."""
        if self.busy:
            return None
        try:
            job = self.job()
        except HistoclusterError as e:
            self._fail(str(e))
            return None
        self.status.value = f"Clustering {job.slide_path.name} (k={job.k})…"
        return self._start(_session.run_clustering, job, on_done=self._show_view)

    def _on_k_changed(self, _value: int) -> None:
        if self._view is not None and not self.busy:
            self._recluster_timer.start(RECLUSTER_DELAY_MS)

    def _recluster(self) -> None:
        """k changed: cluster again from the stored features (no encoding)."""
        view = self._view
        if view is None:
            return
        if self.busy:
            self._recluster_timer.start(RECLUSTER_DELAY_MS)
            return
        job = view.job.with_k(int(self.k.value))
        self.status.value = f"Re-clustering from stored features (k={job.k})…"
        self._start(_session.recluster, view, job.k, on_done=self._show_view)

    def cancel(self, _value: Any = None) -> None:
        """Ask the running worker to stop at its next progress report."""
        if self.busy:
            self._cancel.set()
            self.status.value = "Cancelling…"

    def _start(self, func: Any, *args: Any, on_done: Any) -> Any:
        """Run ``func(*args, progress=...)`` in a worker thread; ``on_done(result)`` in the GUI.

        Progress, result and error all travel through one queued signal, so they arrive in the
        order they were sent.
        """
        self._cancel.clear()
        self._on_done = on_done
        bridge, report = self._bridge, self._report

        def job() -> None:
            try:
                result = func(*args, progress=report)
            except BaseException as e:  # delivered to the GUI thread, shown there
                bridge.event.emit(("error", e))
            else:
                bridge.event.emit(("done", result))

        worker = create_worker(job, _start_thread=False, _ignore_errors=True)
        self._worker = worker
        self._set_busy(True)
        worker.start()
        return worker

    def _report(self, stage: str, done: int, total: int) -> None:
        """Called in the worker thread: forward progress, stop when cancelled."""
        self._bridge.event.emit(("progress", stage, int(done), int(total)))
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    def _on_event(self, event: tuple) -> None:
        """Handle worker events in order, even when a handler re-enters the event loop."""
        self._events.append(event)
        if self._handling:
            return  # napari's progress bar may process events while we handle one
        self._handling = True
        try:
            while self._events:
                self._handle(self._events.popleft())
        finally:
            self._handling = False

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "progress":
            self._on_progress(*event[1:])
            return
        self._worker = None
        self._close_pbar()
        self._set_busy(False)
        if kind == "done":
            self._on_done(event[1])
        else:
            self._on_worker_error(event[1])

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage or self._pbar is None:
            self._close_pbar()
            self._stage = stage
            self._pbar = napari_progress(total=max(total, 1), desc=stage)
        self._pbar.n = done
        self._pbar.refresh()
        self.progress_bar.visible = True
        self.progress_bar.max = max(total, 1)
        self.progress_bar.value = min(done, max(total, 1))
        self.progress_bar.label = stage
        self.status.value = f"{stage}: {done} / {total}"

    def _close_pbar(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self._stage = ""

    def _set_busy(self, busy: bool) -> None:
        self.cluster_button.enabled = not busy
        self.cancel_button.enabled = busy
        self.export_button.enabled = not busy
        self.progress_bar.visible = busy
        if busy:
            self.progress_bar.value = 0

    def _on_worker_error(self, error: BaseException) -> None:
        if isinstance(error, Cancelled):
            self.status.value = "Cancelled. Features encoded so far are kept; Cluster resumes."
            show_info("HistoCluster: cancelled")
        elif isinstance(error, HistoclusterError):
            self._fail(str(error))
        else:
            detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            print(detail)  # the traceback is for developers; the user sees one line
            self._fail(
                f"unexpected {type(error).__name__}: {error} — please report this with the log"
            )

    def _fail(self, message: str) -> None:
        self.status.value = f"<span style='color:#ff6b6b'>{_html(message)}</span>"
        show_error(message)

    # ================================================================== result

    def _show_view(self, view: _session.ClusterView) -> None:
        self._view = view
        layer = self._clusters_layer(create=True)
        assert layer is not None
        slide_layer = self._slide_layer_for(view)
        offset = tuple(slide_layer.translate[-2:]) if slide_layer is not None else (0.0, 0.0)
        geom = view.geometry
        layer.data = label_image(view.labels)
        layer.scale = geom.scale
        layer.translate = (geom.translate[0] + offset[0], geom.translate[1] + offset[1])
        if slide_layer is not None:
            layer.units = slide_layer.units[-2:]
        layer.metadata = {
            **layer.metadata,
            "histocluster": {
                "store": str(view.store_path),
                "run": view.run,
                "slide_id": view.slide_id,
            },
        }
        names = self.table.names() if self.table.rowCount() == view.k else None
        selected = [i for i in self.table.selected() if i < view.k]
        self.table.set_clusters(
            cluster_colors(view.k), view.counts, view.exemplars, names=names, selected=selected
        )
        self._refresh_colors()
        self._update_layer_features()
        n = int(view.counts.sum())
        enc = "encoded " + str(view.n_encoded) if view.n_encoded else "features from the store"
        self.status.value = (
            f"{view.slide_id}: {n} tissue tiles in {view.k} clusters ({enc}). "
            "Click a tile to select its cluster."
        )
        self.status.tooltip = f"feature store: {view.store_path}, cluster run {view.run!r}"

    def _slide_layer_for(self, view: _session.ClusterView) -> Image | None:
        for layer in self._viewer.layers:
            if isinstance(layer, Image) and self._layer_path(layer) == view.slide_path:
                return layer
        return self._slide_layer()

    def _clusters_layer(self, create: bool = False) -> Labels | None:
        if self._view is None:
            return None
        slide_layer = self._slide_layer_for(self._view)
        name = (
            slide_layer.name if slide_layer is not None else self._view.slide_id
        ) + CLUSTERS_SUFFIX
        if name in self._viewer.layers:
            layer = self._viewer.layers[name]
            return layer if isinstance(layer, Labels) else None
        if not create:
            return None
        layer = self._viewer.add_labels(
            label_image(self._view.labels),
            name=name,
            opacity=OVERLAY_OPACITY,
            scale=self._view.geometry.scale,
            translate=self._view.geometry.translate,
            units=slide_layer.units[-2:] if slide_layer is not None else None,
        )
        layer.editable = False
        return layer

    @property
    def clusters_layer(self) -> Labels | None:
        """The Labels layer showing the current clustering (None before the first Cluster)."""
        return self._clusters_layer()

    def _refresh_colors(self) -> None:
        layer = self._clusters_layer()
        if layer is None or self._view is None:
            return
        visible = set(self.table.selected()) if self.show_selected_only.value else None
        layer.colormap = labels_colormap(cluster_colors(self._view.k), visible)

    def _update_layer_features(self) -> None:
        """Cluster names in the layer's features, so napari's status bar shows them on hover."""
        layer = self._clusters_layer()
        if layer is None or self._view is None:
            return
        import pandas as pd

        names = self.table.names()
        layer.features = pd.DataFrame(
            {"index": np.arange(self._view.k + 1), "class": ["no tissue", *names]}
        )

    def _on_selection_changed(self, _selected: list[int]) -> None:
        self._refresh_colors()

    # ================================================================== canvas

    def _on_mouse_press(self, viewer: Any, event: Any) -> Any:
        """A click (press and release without dragging) on a tile toggles its cluster."""
        if event.type != "mouse_press" or event.button != 1 or event.modifiers:
            return
        active = viewer.layers.selection.active
        if active is not None and getattr(active, "mode", "pan_zoom") != "pan_zoom":
            return  # the user is painting or drawing
        start = np.asarray(event.position)
        dragged = False
        yield
        while event.type == "mouse_move":
            dragged = True
            yield
        if not dragged or np.allclose(start, event.position):
            self.click_tile_at(tuple(event.position[-2:]))

    def tile_at(self, world_yx: tuple[float, float]) -> tuple[int, int] | None:
        """(row, col) of the current clustering's tile under a world point (um), or None."""
        if self._view is None:
            return None
        slide_layer = self._slide_layer_for(self._view)
        offset = tuple(slide_layer.translate[-2:]) if slide_layer is not None else (0.0, 0.0)
        return self._view.geometry.tile_at(world_yx, offset)  # type: ignore[arg-type]

    def click_tile_at(self, world_yx: tuple[float, float]) -> int | None:
        """Select (or unselect) the cluster of the tile at ``world_yx``; returns the cluster."""
        tile = self.tile_at(world_yx)
        if tile is None or self._view is None:
            return None
        self._query_tile = tile
        cluster = int(self._view.labels[tile])
        if cluster < 0:
            self.status.value = f"tile {tile}: no tissue"
            return None
        self.table.toggle(cluster)
        state = "selected" if cluster in self.table.selected() else "unselected"
        self.status.value = (
            f"tile {tile}: cluster {cluster} ({self.table.names()[cluster]}) {state}"
        )
        return cluster

    def _find_similar_at_cursor(self, viewer: Any) -> None:
        tile = self.tile_at(tuple(viewer.cursor.position[-2:]))
        if tile is None:
            show_warning("Find similar: put the cursor over a tissue tile of the clustered slide")
            return
        self.find_similar(tile)

    def find_similar(self, tile: tuple[int, int] | None = None) -> list[tuple[int, int, float]]:
        """Mark the tiles of this slide most similar to ``tile`` (default: the last clicked)."""
        if self._view is None:
            self._fail("Find similar: cluster a slide first")
            return []
        tile = tile or self._query_tile
        if tile is None:
            self._fail("Find similar: click a tile first, or press Shift-F over one")
            return []
        try:
            hits = _session.similar_tiles(self._view, tile, int(self.n_similar.value))
        except HistoclusterError as e:
            self._fail(str(e))
            return []
        self._draw_similar(tile, hits)
        self.status.value = (
            f"{len(hits)} tiles most similar to tile {tile} marked (yellow; the query in cyan)."
        )
        return hits

    def _draw_similar(self, query: tuple[int, int], hits: list[tuple[int, int, float]]) -> None:
        assert self._view is not None
        geom = self._view.geometry
        slide_layer = self._slide_layer_for(self._view)
        oy, ox = tuple(slide_layer.translate[-2:]) if slide_layer is not None else (0.0, 0.0)

        def rect(row: int, col: int) -> np.ndarray:
            x0, y0, x1, y1 = geom.tile_bounds_l0(row, col)
            mx, my = geom.mpp
            ys = np.array([y0, y1]) * my - 0.5 * my + oy
            xs = np.array([x0, x1]) * mx - 0.5 * mx + ox
            return np.array([[ys[0], xs[0]], [ys[0], xs[1]], [ys[1], xs[1]], [ys[1], xs[0]]])

        rects = [rect(*query)] + [rect(r, c) for r, c, _ in hits]
        colors = ["cyan"] + ["yellow"] * len(hits)
        name = (
            slide_layer.name if slide_layer is not None else self._view.slide_id
        ) + SIMILAR_SUFFIX
        width = 0.08 * geom.tile_l0[0] * geom.mpp[0]
        if name in self._viewer.layers:
            self._viewer.layers.remove(name)
        layer = self._viewer.add_shapes(
            rects,
            shape_type="rectangle",
            edge_color=colors,
            face_color="transparent",
            edge_width=width,
            name=name,
            units=slide_layer.units[-2:] if slide_layer is not None else None,
        )
        assert isinstance(layer, Shapes)
        self._viewer.layers.selection.active = self._clusters_layer() or layer

    # ================================================================== export

    def export_selected(self, _value: Any = None) -> Any:
        """Export the selected clusters with their names through ``engine.export`` (in a worker)."""
        if self._view is None:
            self._fail("Export: cluster a slide first")
            return None
        selected = self.table.selected()
        if not selected:
            self._fail("Export: select at least one cluster (tick it in the table or click a tile)")
            return None
        names = self.table.names()
        chosen = [names[i] for i in selected]
        problem = _session.check_names(chosen)
        if problem:
            self._fail(f"Export: {problem}")
            return None
        out_text = self.export_dir.line_edit.value.strip()
        if not out_text:
            self._fail("Export: choose a folder under 'export to'")
            return None
        if self.busy:
            return None
        out = Path(out_text).expanduser()
        self.status.value = f"Exporting {len(selected)} clusters to {out}…"
        return self._start(
            _session.export_clusters,
            self._view,
            selected,
            chosen,
            out,
            on_done=self._show_export,
        )

    def _show_export(self, report: _session.ExportReport) -> None:
        lines = ", ".join(f"{name}: {n}" for name, n in report.per_class.items())
        message = f"Exported {report.total} patches to {report.out_dir} ({lines})"
        self.status.value = _html(message + ". " + " ".join(report.warnings))
        show_info(message)
        for warning in report.warnings:
            show_warning(warning)


class _ViewerHooks:
    """The widget's mouse callback and key binding on the viewer, holding the widget weakly.

    The viewer outlives the widget; once the widget is gone (its dock closed), the hooks remove
    themselves instead of keeping it alive.
    """

    def __init__(self, widget: HistoClusterWidget, viewer: Any) -> None:
        self._widget = weakref.ref(widget)
        self._viewer = weakref.ref(viewer)
        viewer.mouse_drag_callbacks.append(self.on_mouse)
        viewer.bind_key("Shift-F", self.on_find_similar, overwrite=True)

    def _alive(self) -> HistoClusterWidget | None:
        widget = self._widget()
        if widget is None:
            self.remove()
        return widget

    def remove(self) -> None:
        viewer = self._viewer()
        if viewer is None:
            return
        if self.on_mouse in viewer.mouse_drag_callbacks:
            viewer.mouse_drag_callbacks.remove(self.on_mouse)
        viewer.bind_key("Shift-F", None, overwrite=True)

    def on_mouse(self, viewer: Any, event: Any) -> Any:
        widget = self._alive()
        if widget is not None:
            yield from widget._on_mouse_press(viewer, event) or ()

    def on_find_similar(self, viewer: Any) -> None:
        widget = self._alive()
        if widget is not None:
            widget._find_similar_at_cursor(viewer)


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
