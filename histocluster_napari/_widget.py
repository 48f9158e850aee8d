"""The HistoCluster dock widget: open a slide or a cohort, cluster, curate the clusters, export.

A thin layer over ``engine``: every piece of work (``_session``, ``_gallery``) runs in a worker
thread so the UI stays responsive; the widget gathers inputs, shows progress, draws the current
slide's clusters as a Labels layer on the tile grid (``_overlay``) and turns errors into
notifications that say what to do. What the user decides (class names, the export selection,
per-tile corrections) lives in the run's ``engine.curation.Curation``, which the widget only
edits and observes; it is saved beside the run in the store, carried onto the next run by
``engine.curation_match.carry_over`` (so names follow their clusters, not row numbers) and
exported by ``engine.export`` exactly as the command line would.

A cohort (a folder of slides, or a store) is shown one slide at a time: choosing a slide in the
list (or a gallery tile) swaps the image and labels layers, it never stacks them.
"""

from __future__ import annotations

# First, before anything imports torch: keep Triton out of the GUI process (see the module).
from histocluster_napari import _triton_guard  # noqa: F401

# isort: split

import gc
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
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
from napari.layers import Image, Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import QFileDialog, QSizePolicy
from superqt.utils import create_worker

from engine.curation import Change
from engine.encoders import REGISTRY
from engine.errors import HistoclusterError
from engine.models import default_encoder_spec
from engine.progress import Cancelled
from engine.slide import slide_id
from engine.store import FeatureStore
from engine.tiling import Tiling
from engine.tissue import TISSUE_METHODS
from histocluster_napari import _classifier, _map, _session
from histocluster_napari._background import in_background
from histocluster_napari._canvas_click import on_click
from histocluster_napari._classifier_panel import ClassifierPanel
from histocluster_napari._cluster_table import ClusterTable
from histocluster_napari._cohort import cohort_rows, folder_slides, store_slides
from histocluster_napari._display_pyramid import TileReader, pyramid_id
from histocluster_napari._encoder_choice import EncoderChoice
from histocluster_napari._gallery import PAGE, GalleryTile, gallery_order, read_gallery
from histocluster_napari._gallery_view import GalleryView
from histocluster_napari._held_controls import HeldControls
from histocluster_napari._idle_collect import IdleCollector
from histocluster_napari._map_panel import MapPanel
from histocluster_napari._overlay import (
    GridGeometry,
    cluster_colors,
    curated_label_image,
    hatch_colormap,
    hatch_image,
    hatch_placement,
    labels_colormap,
)
from histocluster_napari._redraw import Redraw
from histocluster_napari._slide_layers import METADATA_KEY, slide_layer_data
from histocluster_napari._slide_list import SlideList, set_bar
from histocluster_napari._slide_loader import SlideLoader
from histocluster_napari._slide_progress import SlideProgress
from histocluster_napari._store_layers import CLUSTERS_SUFFIX
from histocluster_napari._tile_outlines import (
    HIT,
    MARK,
    QUERY,
    blank_outline_levels,
    outline_colormap,
    outline_levels,
    outline_placement,
)
from histocluster_napari._vertical_scroll import VerticalScroll

if TYPE_CHECKING:
    import napari

SIMILAR_SUFFIX = " similar"
UNREADABLE_SUFFIX = " unreadable"
MARK_LAYER = "gallery tile"
RECLUSTER_DELAY_MS = 400
PROGRESS_INTERVAL_MS = 150
"""Progress bars are redrawn at most this often (each redraw repaints the window)."""
TILES_INTERVAL_MS = 100
"""The slide's pixels are shown this long after the last chunk the view wants is read."""
TILES_STREAMING_MS = 400
"""While chunks are still being read, what was read is shown at most this often: each showing
is a new texture of the whole view (on software GL at 1920x1080, ~100 ms of the GUI thread)."""
SAVE_DELAY_MS = 300
FIRST_DRAW_MS = 150
"""Plugin start: how long each unused layer stays shown (transparent) for its first draw."""
DOCK_PAINT_MS = 150
"""Plugin start: the warm-up thread starts this long after the widget is made, once the dock
is painted (a thread holding the GIL meanwhile stretched that first paint to 240 ms)."""
WORKER_START_MS = 15
"""A worker thread starts this long after the click that started it (see ``_start``)."""
START_PASS_GAP_MS = 30
"""Plugin start: the pause between two steps, so the event loop paints and ticks between."""
NOTICE_DELAY_MS = 60
"""A run's warnings go to napari's notification toast this long after the run is shown: the
status line says them at once, the toast waits for the table's frame."""
OVERLAY_OPACITY = 0.6
KEYS = {"Shift-F": "find similar", "Shift-M": "move", "Shift-X": "exclude", "Shift-U": "restore"}
"""Viewer keys: tile under the cursor -> similar tiles / to the correction class / excluded / back."""


class _Bridge(QObject):
    """Carries progress from the worker thread to the GUI thread (queued connection)."""

    event = Signal(object)  # ("progress", stage, done, total) | ("done", result) | ("error", exc)


class _GalleryBridge(QObject):
    """Carries gallery thumbnails from their worker to the GUI thread."""

    event = Signal(object)  # ("tile", generation, GalleryTile, rgb) | ("end", generation, error)


def _is_registry_spec(spec: str) -> bool:
    """``name:path`` of a registry encoder (a local copy of its weights)."""
    name, sep, _ = spec.partition(":")
    return bool(sep) and name in REGISTRY


class HistoClusterWidget(Container):
    """Dock widget: slides, encoder, tiling, k and store in; clusters, curation and export out."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        _freeze_once("loaded")  # what napari, torch and the plugin loaded (see _prepare_layers)
        super().__init__(labels=True)
        self._results_built = 0  # groups of RESULTS made (in the first start passes)
        self._viewer = viewer
        self._worker: Any = None
        self._cancel = threading.Event()
        self._stage = ""
        self._view: _session.ClusterView | None = None
        self._painted: _session.ClusterView | None = None  # shown, its run still being written
        self._before_paint: _session.ClusterView | None = None  # shown before it (error: back)
        self._save_deferred = False
        self._cohort: list[Path] | None = None  # None: the slide layer picked under 'slide'
        self._current: str | None = None  # slide id shown
        self._cohort_layer: Image | None = None
        self._labels_layer: Labels | None = None
        self._failed_layer: Labels | None = None
        self._query_tile: tuple[int, int] | None = None
        self._bridge = _Bridge()
        self._bridge.event.connect(self._on_event)
        self._on_done: Any = None
        self._events: deque[tuple] = deque()
        self._handling = False
        self._recluster_timer = QTimer()
        self._recluster_timer.setSingleShot(True)
        self._recluster_timer.timeout.connect(self._recluster)
        self._save_timer = QTimer()
        self._save_timer.setSingleShot(True)
        self._save_timer.timeout.connect(self.save_curation)
        self.native.destroyed.connect(self._on_closed)
        self._rows_bridge = _GalleryBridge()
        self._rows_bridge.event.connect(self._show_rows)
        self._shown_key: Any = None
        self._colors_key: Any = None
        self._colors_deferred = False  # True while a view's table is filled (_show_view)
        self._features_key: Any = None
        self._tiles = TileReader()  # the shown slide's finer pixels, read in a background thread
        self._tiles.arrived.connect(self._on_tiles_arrived)
        self._shown_pyramid: int | None = None
        self._tiles_timer = QTimer()
        self._tiles_timer.setSingleShot(True)
        self._tiles_timer.timeout.connect(self._show_arrived_tiles)
        self._slides = SlideLoader(self._tiles)  # slides opened for viewing, in the background
        self._slides.loaded.connect(self._on_slide_loaded)
        self._pending_camera: tuple[tuple[float, float], float] | None = None
        self._image_camera_pending = False  # a slide swapped in: its camera set when shown
        self._mark: tuple[str, int, int] | None = None  # the gallery tile outlined
        self._redraw = Redraw(  # the canvas's parts, each drawn in its own event-loop pass
            [
                ("image", self._draw_image),
                ("image camera", self._draw_image_camera),
                ("image shown", self._draw_image_shown),
                ("labels", self._draw_overlays),
                ("colours", self._refresh_colors),
                ("labels shown", self._draw_labels_shown),
                ("labels active", self._draw_labels_active),
                ("mark", self._draw_mark),
            ]
        )
        self._collector = IdleCollector(  # a full GC pass after each job, in a pass of its own
            lambda: not self.busy and not self._redraw.pending and not self.gallery_loading
        )
        self._slide_progress: SlideProgress | None = None
        self._latest_progress: tuple[str, int, int] | None = None
        self._latest_slides: dict[str, tuple[int, int]] | None = None
        self._progress_timer = QTimer()
        self._progress_timer.setSingleShot(True)
        self._progress_timer.timeout.connect(self._apply_progress)
        self._gallery_bridge = _GalleryBridge()
        self._gallery_bridge.event.connect(self._on_gallery_event)
        self._gallery_generation = 0
        self._gallery_order: list[GalleryTile] = []
        self._gallery_next = 0
        self._gallery_loading = False
        self._gallery_stop = threading.Event()
        self._similar_bridge = _Bridge()  # (generation, slide, tile, hits, error) of a query
        self._similar_bridge.event.connect(self._on_similar_found)
        self._similar_generation = 0
        self.similar_hits: list[tuple[int, int, float]] | None = None  # the last query's

        # ---- inputs
        self.slide = ComboBox(label="slide", choices=self._slide_choices, nullable=True)
        self.open_folder_button = PushButton(
            text="Open folder…", tooltip="Open a folder of slides as a cohort"
        )
        self.open_store_button = PushButton(
            text="Open store…",
            tooltip="Open a feature store (features.zarr) with its slides, run and curation",
        )
        self.slide_list = SlideList()
        self.slide_list.setVisible(False)
        self.slide_mpp = _number_box(
            "slide um/px",
            (0.0, 0.0, 100.0, 0.001),
            "Micrometres per pixel of the slide's full resolution. Needed only when the file "
            "has no resolution metadata; 0 = from the file.",
            visible=False,
        )
        self.encoder = EncoderChoice(
            label="encoder",
            value=default_encoder_spec(),
        )
        self.tile_px = SpinBox(label="tile px", value=224, min=16, max=4096, step=16)
        self.target_mpp = _number_box("um/px", (0.5, 0.05, 64.0, 0.25), "Resolution of the tiles.")
        self.tissue_method = ComboBox(
            label="tissue",
            choices=list(TISSUE_METHODS),
            value="otsu",
            tooltip="How tissue is told from background on the slide's thumbnail.",
        )
        self.min_tissue = _number_box(
            "min tissue",
            (0.5, 0.0, 1.0, 0.05),
            "A tile is encoded and clustered when at least this share of it is tissue.",
        )
        self.k = SpinBox(label="k", value=8, min=2, max=64, tooltip="Number of clusters.")
        self.store = FileEdit(
            label="feature store",
            mode="w",
            filter="Feature stores (*.zarr)",
            value="",
            tooltip="Where the features are kept. Empty: a cache directory keyed by slides, "
            "encoder and tiling, so clicking Cluster again never re-encodes.",
        )
        self.extract_button = PushButton(
            text="Extract all", tooltip="Encode every slide's missing tiles (no clustering)"
        )
        self.cluster_button = PushButton(text="Cluster")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress_bar = ProgressBar(label="", value=0, min=0, max=1, visible=False)
        self.status = Label(
            label="", value="Open a slide or a folder of slides, then click Cluster."
        )
        run_box = Container(
            widgets=[
                Container(
                    layout="horizontal",
                    widgets=[self.extract_button, self.cluster_button, self.cancel_button],
                    labels=False,
                ),
                self.progress_bar,
                self.status,
            ],
            labels=False,
        )
        open_box = Container(
            layout="horizontal",
            widgets=[self.open_folder_button, self.open_store_button],
            labels=False,
        )
        self.extend([self.slide])
        scroll = VerticalScroll()  # the sections scroll (taller than a laptop's screen)
        self.native.layout().addWidget(scroll)
        self.body = scroll.body
        self.body.layout().addWidget(open_box.native)
        self.body.layout().addWidget(self.slide_list)
        feature_inputs = (  # what the store's features depend on
            self.slide_mpp,
            self.encoder,
            self.tile_px,
            self.target_mpp,
            self.tissue_method,
            self.min_tissue,
        )
        inputs = Container(widgets=[*feature_inputs, self.k, self.store], labels=True)
        self.body.layout().addWidget(inputs.native)
        self.body.layout().addWidget(run_box.native)
        self._run_box, self._inputs = run_box, inputs
        for box in (inputs, open_box):
            box.native.setContentsMargins(0, 0, 0, 0)
        self.store.line_edit.native.setPlaceholderText("(cache, keyed by slide and encoder)")
        self.status.native.setWordWrap(True)
        lines = self.status.native.fontMetrics().lineSpacing()
        self.status.native.setMinimumHeight(3 * lines + 4)
        self.status.native.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.status.native.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.status.native.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.min_width = 460

        # ---- wiring
        self.cluster_button.changed.connect(self.run_cluster)
        self.extract_button.changed.connect(lambda _: self.extract_all())
        self.cancel_button.changed.connect(self.cancel)
        self.open_folder_button.changed.connect(lambda _: self._ask_folder())
        self.open_store_button.changed.connect(lambda _: self._ask_store())
        self.slide_list.slide_chosen.connect(self.show_slide)
        self.slide.changed.connect(self._on_slide_changed)
        self.slide_mpp.changed.connect(self._on_slide_mpp_changed)
        self.k.changed.connect(self._on_k_changed)
        for w in (self.slide, *feature_inputs):
            w.changed.connect(self._update_store_hint)
        for event in (viewer.layers.events.inserted, viewer.layers.events.removed):
            event.connect(self._on_layers_changed)
        self._viewer_hooks = _ViewerHooks(self, viewer)
        self._rect_layers: dict[str, Labels] = {}  # tile outlines (see _tile_outlines)
        self._outlined: set[str] = set()  # the kinds of outline drawn once at least
        self._outlined_on: dict[str, str] = {}  # kind -> the slide its outlines are drawn on
        self._prepare_layers()  # in the next event-loop passes
        self._on_layers_changed()
        self._update_store_hint()

    #: The widgets below the run box, made in the first start passes (``_build_results``), so
    #: the dock is made and first painted in two short passes instead of one long one. Each
    #: group: the attributes it makes, and the method that makes them and lays them out. One
    #: asked for before its pass is made then, with those above it.
    RESULTS = (
        (("table", "show_selected_only", "find_similar_button", "n_similar", "correction_class",
          "export_dir", "export_button", "_actions", "gallery"), "_build_table_and_actions"),
        (("classifier",), "_build_classifier"),
        (("map_panel",), "_build_map_panel"),
        ((), "_lay_out_gallery"),  # made with the table (the classifier panel connects to it)
    )  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        """A result widget not made yet (``RESULTS``) is made now; else magicgui's lookup."""
        built = self.__dict__.get("_results_built")
        if built is not None and any(name in names for names, _ in self.RESULTS[built:]):
            while self._build_results() and name not in self.__dict__:
                pass
            return self.__dict__[name]
        return super().__getattr__(name)

    def _build_results(self) -> bool:
        """Make the next group of ``RESULTS`` and add it below the others; False when none is
        left. Each group is one start pass (the table and actions: ~15 ms, a panel: 5-10 ms, and
        the dock's paint after it)."""
        built = self._results_built
        if built >= len(self.RESULTS):
            return False
        self._results_built = built + 1
        getattr(self, self.RESULTS[built][1])(self.body.layout())
        return True

    def _build_classifier(self, layout: Any) -> None:
        self.classifier = ClassifierPanel(self)
        layout.addWidget(self.classifier.native)

    def _build_map_panel(self, layout: Any) -> None:
        self.map_panel = MapPanel(self)
        layout.addWidget(self.map_panel.native)

    def _lay_out_gallery(self, layout: Any) -> None:
        layout.addWidget(self.gallery)  # below the map

    def _build_table_and_actions(self, layout: Any) -> None:
        self.table = ClusterTable()
        self.show_selected_only = CheckBox(text="Show selected only")
        self.find_similar_button = PushButton(
            text="Find similar (Shift-F)",
            tooltip="Mark the tiles most similar to the last clicked tile (Shift-F: the tile "
            "under the cursor).",
        )
        self.n_similar = SpinBox(label="similar tiles", value=20, min=1, max=1000)
        self.correction_class = ComboBox(
            label="correct to",
            choices=self._class_choices,
            nullable=True,
            tooltip="Shift-M moves the tile under the cursor to this class, Shift-X excludes it, "
            "Shift-U gives it back to its cluster.",
        )
        self.export_dir = FileEdit(label="export to", mode="d", value="")
        self.export_button = PushButton(text="Export selected")

        actions = Container(
            widgets=[
                self.show_selected_only,
                self.n_similar,
                self.find_similar_button,
                self.correction_class,
                self.export_dir,
                self.export_button,
            ],
            labels=True,
        )
        actions.native.setContentsMargins(0, 0, 0, 0)
        self._actions = actions
        layout.addWidget(self.table)
        layout.addWidget(actions.native)
        self.table.selection_changed.connect(self._on_selection_changed)
        self.table.name_edited.connect(self._on_name_edited)
        self.table.cellClicked.connect(lambda row, _col: self.show_gallery(row))
        self.show_selected_only.changed.connect(lambda _: self._refresh_colors())
        self.find_similar_button.changed.connect(lambda _: self.find_similar())
        self.export_button.changed.connect(lambda _: self.export_selected())
        self.gallery = GalleryView()
        self.gallery.tile_clicked.connect(self.jump_to_tile)
        self.gallery.more_wanted.connect(self._gallery_more)

    def _prepare_layers(self) -> None:
        """Make, once, the (hidden) layers the widget draws in: the cohort's slide, the
        clusters, the gallery tile outline and the similar tiles, and draw each once.

        napari builds a layer's visuals and controls when it is added (hundreds of ms on the
        GUI thread, every time), and vispy compiles a layer's shaders when it is first drawn;
        here both happen once, at plugin start, and the work that follows (open a folder,
        cluster, click a gallery tile) only swaps the layers' data. Each step runs in its own
        event-loop pass after the widget is made, so the dock shows at once and the viewer
        stays responsive between steps; ``start_passes`` records (step, seconds) of each.
        A layer needed before its step is made there and then (``_swap_image``,
        ``_draw_labels``, ``_draw_outlines``); its step then does nothing.

        The layer steps wait (polling, the GUI thread free) for ``_warm_up``'s thread, which
        loads what napari's first layers import (1-2 s on the GUI thread otherwise). The last
        step (and the widget's creation before) moves every object alive by then (napari, torch,
        ~540,000 tracked objects) to the collector's permanent generation (``_freeze_once``): a
        full collection scanning them took 300-380 ms, holding the GIL, on whichever thread
        happened to trigger it (a widget's creation: 290-400 ms with one, 80-130 without).
        """
        self.start_passes: list[tuple[str, float]] = []
        self.start_pass_began: list[float] = []  # perf_counter() when each of them began
        self._warming: dict[int, tuple[Any, float]] = {}  # shown for the first draw: opacity
        slide = lambda w: w._cohort_layer if w._cohort is None else None  # noqa: E731
        clusters = lambda w: w._labels_layer if w._view is None else None  # noqa: E731
        outline = lambda kind: lambda w: w._unused_rect_layer(kind)  # noqa: E731
        controls = HeldControls(self._viewer)

        def held(name: str, make_layer: Any) -> list[tuple[str, Any, int]]:
            """A layer made in one pass, its controls in the next (see ``HeldControls``)."""

            def make(w: HistoClusterWidget) -> None:
                with controls.hold():
                    make_layer(w)

            make_controls = (f"{name}: controls", lambda _w: controls.make(), START_PASS_GAP_MS)
            return [(name, make, START_PASS_GAP_MS), make_controls]  # (a frame between them)

        steps: list[tuple[str, Any, int]] = [  # (name, called with the widget, ms to the next)
            *[
                (f"dock: {builder}", HistoClusterWidget._build_results, START_PASS_GAP_MS)
                for _, builder in self.RESULTS
            ],  # the widgets below the run box, a group per pass
            ("warm-up started", lambda _w: _warm_up(), 0),
            (WAIT_FOR_WARM_UP, None, 0),  # polled, not run: the GUI thread stays free meanwhile
            *held("slide layer", HistoClusterWidget._make_slide_layer),
            *held("clusters layer", HistoClusterWidget._make_clusters_layer),
            *held("similar tiles layer", lambda w: w._make_rect_layer("similar")),
            *held("gallery tile layer", lambda w: w._make_rect_layer("mark")),
            ("first draw: slide", lambda w: w._draw_once(slide(w)), FIRST_DRAW_MS),
            ("first draw: clusters", lambda w: w._draw_once(clusters(w)), FIRST_DRAW_MS),
            ("first draw: similar", lambda w: w._draw_once(outline("similar")(w)), FIRST_DRAW_MS),
            ("first draw: gallery tile", lambda w: w._draw_once(outline("mark")(w)), FIRST_DRAW_MS),
            ("hide after the first draw", lambda w: w._draw_once(None), 0),
            ("freeze the start-up objects", lambda _w: _freeze_once("layers"), 0),
        ]
        self._n_start_passes = len(steps) - 1  # less the wait
        ref = weakref.ref(self)

        def run(i: int) -> None:
            widget = ref()
            if widget is None:
                return
            name, step, gap_ms = steps[i]
            if step is None:  # wait for the warm-up thread, checking every few ms
                if _warming():
                    del widget
                    QTimer.singleShot(WARM_UP_POLL_MS, lambda: run(i))
                    return
                widget.warm_up_s = time.perf_counter() - started
                del widget
                QTimer.singleShot(0, lambda: run(i + 1))
                return
            if not _viewer_open(widget._viewer):
                return  # closed meanwhile: napari's layer controls are gone
            try:
                widget.native.objectName()
                t0 = time.perf_counter()
                step(widget)
            except RuntimeError:  # the widget or the viewer was closed meanwhile
                return
            widget.start_passes.append((name, time.perf_counter() - t0))
            widget.start_pass_began.append(t0)
            del widget
            if i + 1 < len(steps):  # a gap: the event loop paints and ticks between passes
                QTimer.singleShot(gap_ms, lambda: run(i + 1))

        started = time.perf_counter()
        self.warm_up_s: float | None = None  # wall seconds until the warm-up thread ended
        QTimer.singleShot(DOCK_PAINT_MS, lambda: run(0))  # after the dock is first painted

    def _use_layer(self, layer: Any) -> None:
        """``layer`` is drawn in now: no longer shown only for its first draw."""
        warming = self._warming.pop(id(layer), None)
        if warming is not None:
            layer.opacity = warming[1]

    @property
    def layers_ready(self) -> bool:
        """True once every step of ``_prepare_layers`` has run."""
        return len(self.start_passes) >= self._n_start_passes

    def _make_slide_layer(self) -> None:
        if self._cohort_layer is not None:
            return
        _wait_for_warm_up()
        # Sides that are not powers of two, as a slide's view is not: Mesa's llvmpipe compiles
        # a shader variant per kind of texture, at its first draw (open folder: 83-111 ms with
        # a 2 x 2 blank, 54-74 with this one; cold shader cache, benchmarks/ui_stall.py).
        blank = [np.zeros((61, 93, 3), np.uint8), np.zeros((30, 46, 3), np.uint8)]
        self._cohort_layer = Image(
            blank, multiscale=True, rgb=True, contrast_limits=(0, 255), units=("um", "um"),
            name="HistoCluster slide", visible=False,
        )  # fmt: skip
        with _not_activated(self._viewer):
            self._viewer.layers.insert(0, self._cohort_layer)  # under the rest (no move after)

    def _make_clusters_layer(self) -> None:
        if self._labels_layer is not None:
            return
        blank = np.zeros((37, 53), np.uint8)  # as the slide layer's: not powers of two
        self._labels_layer = _view_labels(  # (not activated: see _view_labels)
            self._viewer, blank, name="HistoCluster clusters", opacity=OVERLAY_OPACITY,
            units=("um", "um"), visible=False,
        )  # fmt: skip

    def _make_rect_layer(self, kind: str) -> None:
        if kind in self._rect_layers:
            return
        name = MARK_LAYER if kind == "mark" else "HistoCluster similar"
        self._rect_layers[kind] = _outline_layer(self._viewer, name, units=("um", "um"))

    def _unused_rect_layer(self, kind: str) -> Labels | None:
        layer = self._rect_layers.get(kind)
        unused = layer is not None and not layer.visible and kind not in self._outlined
        return layer if unused else None

    def _draw_once(self, layer: Any) -> None:
        """Hide the layers shown for their first draw; show ``layer`` (if not None: still unused)
        for one frame, fully transparent (vispy compiles its shaders in that draw). One layer a
        pass: drawing all at once for the first time took 300-400 ms on the GUI thread."""
        for shown, opacity in list(self._warming.values()):
            shown.opacity = opacity
            shown.visible = False
        self._warming.clear()
        if layer is None or layer.visible:
            return
        self._warming[id(layer)] = (layer, layer.opacity)
        layer.opacity = 0.0
        layer.visible = True

    # ================================================================== inputs

    def _slide_choices(self, _widget: Any = None) -> list[tuple[str, Image]]:
        return [
            (layer.name, layer)
            for layer in self._viewer.layers
            if isinstance(layer, Image)
            and layer is not self._cohort_layer
            and self._layer_path(layer) is not None
        ]

    def _class_choices(self, _widget: Any = None) -> list[str]:
        return [] if self._view is None else self._view.curation.classes()

    @staticmethod
    def _layer_path(layer: Image) -> Path | None:
        meta = layer.metadata.get(METADATA_KEY, {})
        if "slide_path" in meta:
            return Path(meta["slide_path"])
        path = getattr(layer.source, "path", None)
        return Path(path) if path else None

    def _on_layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        meta = layer.metadata.get("histocluster", {}) if isinstance(layer, Labels) else {}
        if layer is not self._labels_layer and meta.get("store") and self._view is None:
            # A store opened by the reader (File > Open, drag and drop): take it over as a cohort.
            QTimer.singleShot(0, lambda: self._adopt_store(layer))
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
        if self._cohort is not None:
            return
        layer = self._slide_layer()
        missing = layer is not None and not self._mpp_known(layer)
        self.slide_mpp.visible = missing or self.slide_mpp.value > 0
        if missing and self.slide_mpp.value <= 0:
            self.status.value = (
                f"{layer.name}: the file has no resolution — enter its um/px in 'slide um/px'."
            )

    def _on_slide_mpp_changed(self, value: float) -> None:
        layer = self._slide_layer() if self._cohort is None else self._cohort_layer
        if layer is None or value <= 0:
            return
        layer.scale = (value, value)
        meta = dict(layer.metadata.get(METADATA_KEY, {}))
        meta.update({"mpp": (value, value), "mpp_given": True})
        layer.metadata = {**layer.metadata, METADATA_KEY: meta}
        if self._view is not None and self._layer_path(layer) in self._view.sources.values():
            self._forget_view()  # the grid changes with the resolution: cluster again
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

    def tiling(self) -> Tiling:
        """The tiling the inputs describe (tile size, um/px, tissue method, minimum tissue)."""
        return Tiling(
            tile_px=int(self.tile_px.value),
            target_mpp=float(self.target_mpp.value),
            tissue_method=self.tissue_method.value,
            min_tissue=float(self.min_tissue.value),
        )

    def _store_value(self) -> Path | None:
        text = self.store.line_edit.value.strip()
        return Path(text).expanduser() if text else None

    def encoder_spec(self) -> str:
        """The encoder spec chosen (a registry name, a checkpoint file or ``name:path``)."""
        return self.encoder.value or default_encoder_spec()

    def job(self) -> _session.ClusterJob:
        """The clustering the inputs describe (raises HistoclusterError when they are incomplete)."""
        mpp: float | None = self.slide_mpp.value if self.slide_mpp.value > 0 else None
        if self._cohort is not None:
            slides = tuple(self._cohort)
        else:
            layer = self._slide_layer()
            if layer is None:
                raise HistoclusterError(
                    "no slide — open a whole-slide image (File > Open, or drag it onto the viewer) "
                    "and pick it under 'slide', or open a folder of slides"
                )
            path = self._layer_path(layer)
            assert path is not None
            if mpp is None and not self._mpp_known(layer):
                self.slide_mpp.visible = True
                raise HistoclusterError(
                    f"{path}: no resolution (microns per pixel) in the metadata — enter the "
                    "slide's um/px in the 'slide um/px' field of the HistoCluster widget"
                )
            slides = (path,)
        return _session.ClusterJob(
            slides=slides,
            slide_mpp=mpp,
            encoder=self.encoder_spec(),
            tiling=self.tiling(),
            k=int(self.k.value),
            store=self._store_value(),
        )

    # ================================================================== cohort

    def _ask_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self.native, "Open a folder of slides")
        if folder:
            self.open_folder(Path(folder))

    def _ask_store(self) -> None:
        folder = QFileDialog.getExistingDirectory(self.native, "Open a feature store (.zarr)")
        if folder:
            self.open_store(Path(folder))

    def open_folder(self, folder: Path) -> None:
        """Open the slides in ``folder`` as a cohort (the first one shown); its run, if any."""
        try:
            slides = folder_slides(folder)
        except HistoclusterError as e:
            self._fail(str(e))
            return
        self._enter_cohort(slides)
        self.status.value = (
            f"{len(slides)} slides in {folder}. Click Extract all or Cluster (one K-means over "
            "all of them)."
        )
        self._open_existing_run()

    def open_store(self, store_path: Path) -> Any:
        """Open a feature store as a cohort: its slides, tiling, latest run and its curation."""
        try:
            store = FeatureStore.open(store_path)
            slides = store_slides(store_path)
        except HistoclusterError as e:
            self._fail(str(e))
            return None
        if not slides:
            self._fail(f"{store_path}: holds no slides — extract some first")
            return None
        tiling = store.tiling
        self.store.value = str(store_path)
        self.tile_px.value, self.target_mpp.value = tiling.tile_px, tiling.target_mpp
        self.tissue_method.value, self.min_tissue.value = tiling.tissue_method, tiling.min_tissue
        spec = store.encoder.name
        file = Path(spec.partition(":")[2] if _is_registry_spec(spec) else spec)
        if not file.exists() and store.encoder.sha256:
            show_warning(
                f"{store_path}: its encoder file {spec} is not there — Cluster works from the "
                "stored features; extracting new slides needs that encoder"
            )
        else:
            self.encoder.value = spec
        self._enter_cohort(slides)
        return self._open_existing_run()

    def _adopt_store(self, labels: Labels) -> None:
        """Replace the reader's layers of a store by the widget's cohort view of that store."""
        if self.busy or self._view is not None or labels not in self._viewer.layers:
            return
        meta = labels.metadata["histocluster"]
        for layer in list(self._viewer.layers):
            if layer is labels or (isinstance(layer, Image) and layer.name == meta.get("slide_id")):
                self._viewer.layers.remove(layer)
        self.open_store(Path(meta["store"]))

    def _enter_cohort(self, slides: list[Path]) -> None:
        self._forget_view()
        self._cohort = list(slides)
        self.slide.visible = False
        self.slide_list.setVisible(True)
        self.slide_list.set_rows(cohort_rows(None, self._cohort))  # names now, counts soon
        self._refresh_slide_list()
        self.show_slide(slide_id(slides[0]))
        for path in slides[1:]:  # opened in the background, so switching slides is instant
            self._slides.request((Path(path), None), urgent=False)

    def _open_existing_run(self) -> Any:
        """Show the store's latest run (with its saved curation) when the store has one."""
        try:
            path = self.job().store_path()
            has_run = (path / "zarr.json").is_file() and bool(
                FeatureStore.open(path).cluster_runs()
            )
        except HistoclusterError:
            return None
        if not has_run or self.busy:
            return None
        self.status.value = f"Opening the latest cluster run of {path.name}…"
        return self._start(_session.open_run, path, on_done=self._show_view)

    def _refresh_slide_list(self, wait: bool = False) -> None:
        """Re-read the slides' tissue/encoded counts, in a worker (``wait``: here, now)."""
        if self._cohort is None:
            return
        try:
            store = self.job().store_path()
        except HistoclusterError:
            store = None
        slides, bridge = list(self._cohort), self._rows_bridge
        if wait:
            self._show_rows(cohort_rows(store, slides))
            return
        worker = create_worker(
            in_background(lambda: bridge.event.emit(cohort_rows(store, slides))),
            _start_thread=False,
            _ignore_errors=True,
        )
        worker.start()

    def _show_rows(self, rows: list) -> None:
        if self._cohort is None or [r.path for r in rows] != list(self._cohort):
            return  # rows of a cohort no longer shown
        try:
            self.slide_list.set_rows(rows)
        except RuntimeError:  # the widget was closed while the rows were read
            return
        if self._current is not None:
            self.slide_list.highlight(self._current)

    def _source_of(self, sid: str) -> Path | None:
        if self._view is not None and sid in self._view.sources:
            return self._view.sources[sid]
        for p in self._cohort or ():
            if slide_id(p) == sid:
                return p
        return None

    def show_slide(self, sid: str) -> None:
        """Show slide ``sid`` of the cohort: swap the image layer and the labels (never stack).

        The list and the table follow at once; the canvas in the next event-loop passes, the
        image first, then the clusters (``_redraw``; ``drawing`` is True until then).
        """
        self._current = sid
        if self._cohort is not None:
            self.slide_list.highlight(sid)
            self._redraw.want("image")
        self._redraw.want("labels", "mark")  # (the outlines of another slide hidden)
        if self._view is not None and sid in self._view.counts:
            self.table.set_slide_counts(self._view.counts[sid])
        else:
            self.table.set_slide_counts(None)

    @property
    def drawing(self) -> bool:
        """True while a part of the canvas is still to be redrawn (see ``show_slide``)."""
        return self._redraw.pending

    def _draw_image(self) -> None:
        if self._cohort is None or self._current is None:
            return
        self._swap_image(self._current)
        labels, image = self.clusters_layer, self._image_layer()
        if labels is not None and image is not None and labels.units != image.units[-2:]:
            self._redraw.want("labels")  # in the image layer's units

    def _draw_overlays(self) -> None:
        """The shown slide's clusters (corrections, unreadable tiles) and classes predicted."""
        self._draw_labels()
        self.classifier.redraw()

    def _slide_key(self, sid: str) -> tuple[Path, Any] | None:
        """What the slide loader knows slide ``sid`` by: (file, um/px given or None)."""
        source = self._source_of(sid)
        if source is None:
            return None
        mpp = self._view.mpp.get(sid) if self._view is not None else None
        plain = (Path(source), None)
        if mpp is not None and self._slides.is_loaded(plain):
            shown = self._slides.get(plain)
            if shown is not None and shown.mpp_known and np.allclose(shown.slide.mpp, mpp):
                return plain  # the file's own um/px is the store's: no second opening
        return (Path(source), mpp)

    @property
    def slide_loading(self) -> bool:
        """True while the slide to show is being opened (in the background), until it is shown."""
        return self._redraw.pending or self._image_behind()

    def _image_behind(self) -> bool:
        """True while the cohort's image layer does not show the current slide yet."""
        if self._cohort is None or self._current is None:
            return False
        return self._shown_key != self._slide_key(self._current)

    def _swap_image(self, sid: str) -> None:
        """Put slide ``sid`` into the one cohort image layer (its data replaced in place).

        Replacing the data, rather than removing the layer and adding another, keeps one image
        layer in the viewer; it also avoids a crash of vispy on Mesa's llvmpipe when a layer is
        removed and another added while a Labels layer is drawn. A slide not opened yet is
        opened in the background (``_slides``): the layer takes its name at once and shows
        its pixels when they are read (``_on_slide_loaded``).
        """
        layer = self._cohort_layer
        if layer is not None and layer not in self._viewer.layers:
            layer = self._cohort_layer = None
        key = self._slide_key(sid)
        if layer is not None and layer.name == sid and self._shown_key == key:
            if layer.visible:
                self._apply_pending_camera()
                return
            if self._redraw.wanted("image shown"):
                return  # swapped in already: shown in the next pass
        if key is not None and not self._slides.is_loaded(key):
            self._slides.request(key)
            if layer is not None and layer.name != sid:
                layer.visible = False  # not the previous slide's pixels under this one's labels
                layer.name = sid
            return  # (the same slide, opened again at the store's um/px, stays shown meanwhile)
        shown = self._slides.get(key) if key is not None else None
        self._shown_key = key
        if shown is None:
            if key is not None:
                self._slides.forget(key)  # tried again next time it is shown
            show_warning(
                f"{key[0] if key else sid}: slide {sid!r} not found or unreadable — showing its "
                "clusters only"
            )
            if layer is not None:
                layer.visible = False
            return
        data, kwargs, _ = slide_layer_data(
            shown.slide, mpp_known=shown.mpp_known, name=sid, pyramid=shown.pyramid
        )
        if layer is not None:
            self._use_layer(layer)
        if layer is None:
            _wait_for_warm_up()
            self._cohort_layer = layer = Image(data, **kwargs, visible=False)
            with _not_activated(self._viewer):  # (see _view_labels)
                self._viewer.layers.insert(0, layer)
        else:
            layer.visible = False  # sliced once, at the new camera, when shown again
            layer.data = data
            layer.scale = kwargs["scale"]  # (also renews the hidden layer's extent)
            if tuple(layer.units[-2:]) != tuple(kwargs["units"]):  # each re-computes the dims
                layer.units = kwargs["units"]
            layer.metadata = kwargs["metadata"]
            layer.name = sid
        self._shown_key = key
        self._shown_pyramid = pyramid_id(shown.pyramid)
        self._image_camera_pending = True
        self._redraw.want("image camera", "image shown")

    def _swapped_in(self) -> Any | None:
        """The image layer, when it holds the current slide (``_swap_image`` put it there)."""
        layer = self._cohort_layer
        if layer is None or layer not in self._viewer.layers or layer.name != self._current:
            return None  # forgotten, or another slide wanted meanwhile
        return layer

    def _draw_image_camera(self) -> None:
        """Set, for the slide ``_swap_image`` put into the image layer (still hidden), the camera
        a gallery click asked for, or the whole slide in view: in a pass of its own, since
        every shown layer re-slices at the new camera (10-20 ms)."""
        if self._swapped_in() is not None and self._image_camera_pending:
            self._image_camera_pending = False
            if not self._apply_pending_camera():
                self._viewer.reset_view()

    def _draw_image_shown(self) -> None:
        """Show the slide ``_swap_image`` put into the image layer, in a pass of its own (showing
        re-slices the layer and uploads its textures: 30-40 ms after the data's own)."""
        layer = self._swapped_in()
        if layer is not None:
            layer.visible = True

    def _apply_pending_camera(self) -> bool:
        """Set the camera a gallery click asked for before its slide was shown (if any)."""
        if self._pending_camera is None:
            return False
        (centre, zoom), self._pending_camera = self._pending_camera, None
        camera = self.camera
        camera.center, camera.zoom = centre, zoom
        return True

    def _on_slide_loaded(self, key: Any, _shown: Any) -> None:
        """A slide was opened in the background: show it when it is the one wanted."""
        try:
            self.native.objectName()
        except RuntimeError:  # the widget was closed meanwhile
            return
        if self._cohort is None or self._current is None or self._slide_key(self._current) != key:
            return
        self._redraw.want("image")  # in a pass of its own, not after another part's

    def _on_tiles_arrived(self, pid: int) -> None:
        """Pixels of a slide were read in the background: show them soon if it is the one shown
        (shortly after the last chunk wanted, every ``TILES_STREAMING_MS`` until then)."""
        if pid != self._shown_pyramid:
            return
        timer = self._tiles_timer
        delay = TILES_INTERVAL_MS if self._tiles.idle() else TILES_STREAMING_MS
        if not timer.isActive() or delay < timer.remainingTime():
            timer.start(delay)

    def _show_arrived_tiles(self) -> None:
        try:
            layer = self._image_layer()
        except RuntimeError:  # the widget was closed meanwhile
            return
        if layer is not None and layer.visible and pyramid_id(layer.data) == self._shown_pyramid:
            layer.refresh(thumbnail=False, highlight=False, extent=False)

    # ================================================================== running

    @property
    def busy(self) -> bool:
        """True while a worker runs."""
        return self._worker is not None

    def _new_job(self) -> _session.ClusterJob | None:
        """The inputs' job, when no worker runs and the inputs are complete (else None, said why)."""
        if self.busy:
            return None
        try:
            return self.job()
        except HistoclusterError as e:
            self._fail(str(e))
            return None

    def _start_encoding(
        self, func: Any, job: _session.ClusterJob, *args: Any, on_done: Any, paint: bool = False
    ) -> Any:
        """``_start`` for work that may encode the job's slides: with a progress bar per slide."""
        self._slide_progress = SlideProgress(job.store_path(), job.slides)
        return self._start(func, job, *args, on_done=on_done, paint=paint)

    def run_cluster(self, _value: Any = None) -> Any:
        """Extract features when missing, then K-means over every slide, in a worker."""
        job = self._new_job()
        if job is None:
            return None
        self.save_curation()
        previous = self._view.curation.copy() if self._view is not None else None
        where = self._view.store_path if self._view is not None else None
        what = job.slides[0].name if len(job.slides) == 1 else f"{len(job.slides)} slides"
        self.status.value = f"Clustering {what} (k={job.k})…"
        return self._start_encoding(
            _session.cluster, job, previous, where, on_done=self._show_run, paint=True
        )

    def extract_all(self) -> Any:
        """Encode the missing tiles of every slide (no clustering), in a worker."""
        job = self._new_job()
        if job is None:
            return None
        self.status.value = f"Extracting {len(job.slides)} slide(s)…"
        return self._start_encoding(_session.ensure_features, job, on_done=self._show_extracted)

    def _show_extracted(self, report: _session.FeatureReport) -> None:
        self._refresh_slide_list()
        failed = (
            f" {len(report.failures)} failed: " + "; ".join(report.failures)
            if report.failures
            else ""
        )
        bad = f" {report.unreadable} tiles unreadable (hatched red)." if report.unreadable else ""
        self.status.value = _html(f"Encoded {report.encoded} tiles.{bad}{failed}")
        for line in report.failures:
            show_warning(line)

    def _on_k_changed(self, _value: int) -> None:
        if self._view is not None and not self.busy:
            self._recluster_timer.start(RECLUSTER_DELAY_MS)

    def _recluster(self) -> None:
        """k changed: cluster again from the stored features (no encoding), names carried over."""
        view = self._view
        if view is None:
            return
        if self.busy:
            self._recluster_timer.start(RECLUSTER_DELAY_MS)
            return
        self.save_curation()
        k = int(self.k.value)
        self.status.value = f"Re-clustering from stored features (k={k})…"
        self._start(_session.recluster, view, k, on_done=self._show_run, paint=True)

    def cancel(self, _value: Any = None) -> None:
        """Ask the running worker to stop at its next progress report."""
        if self.busy:
            self._cancel.set()
            self.status.value = "Cancelling…"

    def _start(self, func: Any, *args: Any, on_done: Any, paint: bool = False) -> Any:
        """Run ``func(*args, progress=...)`` in a worker thread; ``on_done(result)`` in the GUI.

        Progress, result and error all travel through one queued signal, so they arrive in the
        order they were sent. ``paint``: ``func`` also takes ``on_view=`` (the session's cluster
        functions), whose view is painted at once while the worker writes its run
        (``_paint_view``).
        """
        self._cancel.clear()
        self._on_done = on_done
        bridge, report = self._bridge, self._report
        kwargs: dict[str, Any] = {"progress": report}
        if paint:
            kwargs["on_view"] = lambda view: bridge.event.emit(("view", view))

        def job() -> None:
            try:
                result = func(*args, **kwargs)
            except BaseException as e:  # delivered to the GUI thread, shown there
                bridge.event.emit(("error", e))
            else:
                bridge.event.emit(("done", result))

        worker = create_worker(in_background(job), _start_thread=False, _ignore_errors=True)
        self._worker = worker
        self._set_busy(True)
        # started after the window has painted the busy state: a worker starting at once takes
        # the GIL turn about with the rest of this slot and the repaint after it (twice as long)
        QTimer.singleShot(WORKER_START_MS, worker.start)
        return worker

    def _report(self, stage: str, done: int, total: int) -> None:
        """Called in the worker thread: forward progress, stop when cancelled."""
        self._bridge.event.emit(("progress", stage, int(done), int(total)))
        per_slide = self._slide_progress
        counts = per_slide(stage, done, total) if per_slide is not None else None
        if counts:
            self._bridge.event.emit(("slides", counts))
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
        if kind == "progress":  # drawn at most every PROGRESS_INTERVAL_MS: the latest one
            self._latest_progress = event[1:]
            if not self._progress_timer.isActive():
                self._progress_timer.start(PROGRESS_INTERVAL_MS)
                self._apply_progress()
            return
        if kind == "slides":  # likewise: each bar's redraw repaints the window
            self._latest_slides = event[1]
            if not self._progress_timer.isActive():
                self._progress_timer.start(PROGRESS_INTERVAL_MS)
                self._apply_progress()
            return
        if kind == "view":
            self._paint_view(event[1])
            return
        self._apply_progress()  # the last counts, once
        self._worker = None
        self._slide_progress = None
        self._latest_progress = self._latest_slides = None
        self._progress_timer.stop()
        self.slide_list.clear_progress()
        self._stage = ""
        self._set_busy(False)
        painted, before = self._painted, self._before_paint
        self._painted = self._before_paint = None
        self._redraw.flush()  # what the view painted drew, before the worker is reported done
        self._collector.soon()
        if kind == "done":
            self._on_done(event[1])
        else:
            if painted is not None and self._view is painted:  # its run was not written
                if before is not None:
                    self._show_view(before)
                else:
                    painted.curation.disconnect(self._on_curation_change)
                    self._view = None  # (its curation has no run to be saved beside)
                    self._forget_view()
            self._save_deferred = False
            self._on_worker_error(event[1])

    def _paint_view(self, view: _session.ClusterView) -> None:
        """A new run's view, before its run is written: shown now, the widget still busy.

        Its curation is not saved and the classifier not opened on it until the run is
        complete in the store (``_show_run``); when the write fails, the view shown before
        comes back.
        """
        self._apply_progress()  # the counts before it, now: not drawn over its status later
        self._progress_timer.stop()
        if self._painted is None:
            self._before_paint = self._view
        self._painted = view
        self._show_view(view, complete=False)

    def _show_run(self, view: _session.ClusterView) -> None:
        """A cluster run is complete in the store: show it (finish it when already painted)."""
        if view is not self._view:
            self._show_view(view)
            return
        self.classifier.open_saved(view)
        if self._save_deferred:
            self.save_curation()  # the edits made while the run was written

    def _apply_progress(self) -> None:
        latest, self._latest_progress = self._latest_progress, None
        slides, self._latest_slides = self._latest_slides, None
        if self._worker is None:
            return
        if latest is not None:
            self._on_progress(*latest)
        if slides is not None:
            self.slide_list.set_progress(slides)

    def _on_progress(self, stage: str, done: int, total: int) -> None:
        label = (
            _session.STAGES.get(stage) or _classifier.STAGES.get(stage) or _map.STAGES.get(stage)
        ) or stage
        self._stage = stage
        self.progress_bar.visible = True
        set_bar(self.progress_bar.native, done, total)
        text = f"{label}: {done} / {total}"
        if self.status.value != text:
            self.status.value = text

    def _set_busy(self, busy: bool) -> None:
        self.cluster_button.enabled = not busy
        self.k.enabled = not busy
        self.extract_button.enabled = not busy
        self.cancel_button.enabled = busy
        self.export_button.enabled = not busy
        self.classifier.set_busy(busy)
        self.progress_bar.visible = busy
        if busy:
            set_bar(self.progress_bar.native, 0, 1)

    def _on_worker_error(self, error: BaseException) -> None:
        self._refresh_slide_list()
        if isinstance(error, Cancelled | KeyboardInterrupt):
            self.status.value = (
                "Cancelled. What was finished is kept: encoded features stay in the store "
                "(Cluster resumes), exported files are complete and listed in the manifest."
            )
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

    @property
    def view(self) -> _session.ClusterView | None:
        """The cluster run shown (None before the first Cluster)."""
        return self._view

    @property
    def curation(self):
        """The shown run's ``Curation`` (names, selection, per-tile overrides), or None."""
        return None if self._view is None else self._view.curation

    def _forget_view(self) -> None:
        if self._view is not None:
            self.save_curation()
            self._view.curation.disconnect(self._on_curation_change)
        self._view = None
        self.classifier.forget()
        self.gallery.clear_tiles(None)
        self.table.setRowCount(0)
        if self._labels_layer is not None and self._labels_layer in self._viewer.layers:
            _hide(self._labels_layer)  # kept, to draw the next run in
        # the gallery tile and a similar-tiles query belong to this run's cohort: forgotten,
        # their outlines hidden (a slide of the same name in the next cohort is another slide)
        self._mark = self._query_tile = None
        self._similar_generation += 1  # a query still running is dropped
        self._hide_outlines()

    def _show_view(self, view: _session.ClusterView, complete: bool = True) -> None:
        """Show a cluster run: table, labels, status. ``complete=False``: its run is not in the
        store yet (painted first): the classifier is opened on it later (``_show_run``)."""
        if self._view is not None:
            self._view.curation.disconnect(self._on_curation_change)
        self._view = view
        self.classifier.forget()
        view.curation.connect(self._on_curation_change)
        if self._current not in view.labels:
            layer = self._slide_layer() if self._cohort is None else None
            path = self._layer_path(layer) if layer is not None else None
            self._current = next(
                (s for s, p in view.sources.items() if p == path), view.slide_ids[0]
            )
        cur = view.curation
        self._colors_deferred = True  # the colour map is set with the labels, in their pass
        try:  # (set here, the frame drawn after it showed the old labels in the new colours)
            self.table.set_clusters(
                cluster_colors(view.k),
                view.totals,
                view.exemplars,
                names=cur.names,
                selected=[c for c in range(view.k) if cur.is_selected(c)],
                slide_counts=view.counts.get(self._current),
            )
        finally:
            self._colors_deferred = False
        if view.k != self.k.value:
            self.k.changed.disconnect(self._on_k_changed)
            self.k.value = view.k
            self.k.changed.connect(self._on_k_changed)
        self.correction_class.reset_choices()
        self.map_panel.lasso_class.reset_choices()
        if complete:
            self.classifier.open_saved(view)
        self.show_slide(self._current)
        self._refresh_slide_list()
        self.gallery.clear_tiles(None)
        n = int(view.totals.sum())
        where = f"{len(view.slide_ids)} slides" if len(view.slide_ids) > 1 else view.slide_ids[0]
        enc = f"encoded {view.encoded}" if view.encoded else "features from the store"
        lines = [
            f"{where}: {n} tissue tiles in {view.k} clusters ({enc}). Click a tile to select "
            "its cluster, a row to see its gallery."
        ]
        moved = [line for line in view.carried[1:]] if view.carried else []
        lines += moved + view.warnings
        if view.n_failed:
            lines.append(
                f"{view.n_failed} tiles could not be read (hatched red; not clustered or "
                "exported — extract with --retry-failed to read them again)."
            )
        self.status.value = _html(" ".join(lines))
        self.status.tooltip = _html(
            f"feature store: {view.store_path}, cluster run {view.run!r}\n"
            + "\n".join(view.carried)
        )
        # The names carried over are said in the status line and its tooltip only: napari's
        # toast slides in over several frames, each recomposing the window (131 ms measured on
        # llvmpipe). What the carry-over lost (a name cleared, overrides dropped) and the run's
        # warnings are toasts too, once the table is drawn.
        for text in view.carried_lost + view.warnings:
            QTimer.singleShot(NOTICE_DELAY_MS, lambda text=text: show_warning(text))

    def _image_layer(self) -> Image | None:
        """The image layer of the slide shown."""
        if self._cohort is not None:
            layer = self._cohort_layer
            return layer if layer is not None and layer in self._viewer.layers else None
        if self._view is not None and self._current in self._view.sources:
            path = self._view.sources[self._current]
            for layer in self._viewer.layers:
                if isinstance(layer, Image) and self._layer_path(layer) == path:
                    return layer
        return self._slide_layer()

    def _offset(self) -> tuple[float, float]:
        layer = self._image_layer()
        return tuple(layer.translate[-2:]) if layer is not None else (0.0, 0.0)  # type: ignore[return-value]

    def _geometry(self) -> GridGeometry | None:
        if self._view is None or self._current not in self._view.geometry:
            return None
        return self._view.geometry[self._current]

    def _draw_labels(self) -> None:
        """(Re)draw the shown slide's clusters, corrections included, in the one labels layer."""
        view, sid, geom = self._view, self._current, self._geometry()
        if view is None or sid is None or geom is None:
            if self._labels_layer is not None and self._labels_layer in self._viewer.layers:
                _hide(self._labels_layer)
            self._draw_failed()
            return
        data = curated_label_image(view.labels[sid], view.curation, sid)
        image = self._image_layer()
        name = (image.name if image is not None else sid) + CLUSTERS_SUFFIX
        oy, ox = self._offset()
        layer = self._labels_layer
        if layer is not None:
            self._use_layer(layer)
        if layer is None or layer not in self._viewer.layers:
            layer = _view_labels(
                self._viewer,
                data,
                name=name,
                opacity=OVERLAY_OPACITY,
                scale=geom.scale,
                translate=(geom.translate[0] + oy, geom.translate[1] + ox),
                units=image.units[-2:] if image is not None else None,
            )
            self._labels_layer = layer
        else:
            translate = (geom.translate[0] + oy, geom.translate[1] + ox)
            hidden = not layer.visible  # napari keeps a hidden layer's extent on a data change;
            layer.data = data  # a scale or translate set after it renews the extent
            if hidden or not np.allclose(layer.scale[-2:], geom.scale):  # each setter redraws
                layer.scale = geom.scale
            if not np.allclose(layer.translate[-2:], translate):
                layer.translate = translate
            layer.name = name
        if image is not None:
            if tuple(layer.units) != tuple(image.units[-2:]):
                layer.units = image.units[-2:]
            self._keep_above(layer, image)
        layer.metadata = {
            **layer.metadata,
            "histocluster": {"store": str(view.store_path), "run": view.run, "slide_id": sid},
        }
        self._draw_failed()
        self._redraw.want("colours", "labels shown")  # a new colormap: 20-30 ms of its own

    def _draw_labels_shown(self) -> None:
        """Show the clusters layer ``_draw_labels`` filled (in a later pass: showing it re-slices
        it and renews the viewer's dims, 20-50 ms after the data's own 10-30 ms)."""
        layer = self.clusters_layer
        if layer is None or self._geometry() is None:
            return  # forgotten, or a slide without clusters shown, meanwhile
        if self.classifier.prediction is None and not layer.visible:
            layer.visible = True  # (setting it when shown re-slices the layer)
        self._redraw.want("labels active")

    def _draw_labels_active(self) -> None:
        """Make the shown clusters layer the active one when nothing the user sees is (napari
        swaps its controls panel in: 20-40 ms), and put its class names in its features (for
        napari's status bar)."""
        layer = self.clusters_layer
        if layer is None or self._geometry() is None:
            return
        active = self._viewer.layers.selection.active
        if active is None or not active.visible:  # nothing the user sees is selected: the
            self._activate(layer)  # clusters' controls (opacity, colours) in napari's panel
        self._update_layer_features()

    def _activate(self, layer: Any) -> None:
        """Make ``layer`` the active one (napari re-emits and redraws even when it already is)."""
        if self._viewer.layers.selection.active is not layer:
            self._viewer.layers.selection.active = layer

    def _keep_above(self, layer: Any, below: Any) -> None:
        """Move ``layer`` to the top when it lies under ``below`` (a slide opened after it)."""
        layers = self._viewer.layers
        if layer in layers and below in layers and layers.index(layer) < layers.index(below):
            layers.move(layers.index(layer), len(layers))

    def _draw_failed(self) -> None:
        """Hatch (red stripes) the shown slide's unreadable tiles; the layer exists once needed."""
        view, sid, geom = self._view, self._current, self._geometry()
        failed = view.failed.get(sid) if view is not None and sid is not None else None
        layer = self._failed_layer
        if layer is not None and layer not in self._viewer.layers:
            layer = self._failed_layer = None
        if failed is None or geom is None or not failed.any():
            if layer is not None:
                _hide(layer)
            return
        image = self._image_layer()
        name = (image.name if image is not None else sid) + UNREADABLE_SUFFIX
        scale, (ty, tx) = hatch_placement(geom)
        oy, ox = self._offset()
        data = hatch_image(failed)
        if layer is None:
            layer = _view_labels(
                self._viewer,
                data,
                name=name,
                scale=scale,
                translate=(ty + oy, tx + ox),
                opacity=0.9,
                units=image.units[-2:] if image is not None else None,
            )
            layer.colormap = hatch_colormap()
            self._failed_layer = layer
        else:
            layer.data = data
            layer.scale, layer.translate = scale, (ty + oy, tx + ox)
            layer.name = name
            layer.visible = True
        if self.clusters_layer is not None:
            self._activate(self.clusters_layer)

    @property
    def failed_layer(self) -> Labels | None:
        """The hatching of the shown slide's unreadable tiles (None or hidden when it has none)."""
        return self._failed_layer

    @property
    def clusters_layer(self) -> Labels | None:
        """The Labels layer showing the current slide's clusters (None before the first Cluster)."""
        layer = self._labels_layer
        if self._view is None or layer is None or layer not in self._viewer.layers:
            return None
        return layer

    def _refresh_colors(self) -> None:
        layer = self.clusters_layer
        if layer is None or self._view is None:
            return
        visible = set(self.table.selected()) if self.show_selected_only.value else None
        key = (id(layer), self._view.k, None if visible is None else frozenset(visible))
        if key == self._colors_key:
            return  # a new colormap costs a texture and a redraw: only when it changes
        self._colors_key = key
        layer.colormap = labels_colormap(cluster_colors(self._view.k), visible)

    def _update_layer_features(self) -> None:
        """Class names in the layer's features, so napari's status bar shows them on hover."""
        layer = self.clusters_layer
        if layer is None or self._view is None:
            return
        names = [n or f"cluster {c} (unnamed)" for c, n in enumerate(self._view.curation.names)]
        if self._features_key == (id(layer), names):
            return
        self._features_key = (id(layer), names)
        layer.features = pd.DataFrame(
            {
                "index": np.arange(self._view.k + 3),
                "class": ["no tissue", *names, "excluded", "moved (override)"],
            }
        )

    # ================================================================== curation

    def _on_selection_changed(self, selected: list[int]) -> None:
        if self._view is not None:
            cur, chosen = self._view.curation, set(selected)
            for c in range(min(cur.k, self.table.rowCount())):
                cur.select(c, c in chosen)
        if not self._colors_deferred:
            self._refresh_colors()

    def _on_name_edited(self, cluster: int, text: str) -> None:
        if self._view is None:
            return
        try:
            self._view.curation.name_cluster(cluster, text)
        except (ValueError, TypeError) as e:
            self._fail(str(e))
            self.table.set_names(self._view.curation.names)

    def _on_curation_change(self, change: Change) -> None:
        """The curation changed (here or elsewhere): redraw what depends on it, save soon."""
        if self._view is None:
            return
        if change.kind == "replace":
            cur = self._view.curation
            self.table.set_names(cur.names)
            self.table.set_selected([c for c in range(cur.k) if cur.is_selected(c)])
        if change.kind in ("name", "override", "replace"):
            self._draw_labels()
            self.correction_class.reset_choices()
            self.map_panel.lasso_class.reset_choices()
        self._save_timer.start(SAVE_DELAY_MS)

    def _on_closed(self, *_: Any) -> None:
        """The dock widget is gone (viewer closed): an edit still waiting for its save is written
        now, and none of the widget's timers fires after it (they would touch deleted labels)."""
        try:
            pending = self._save_timer.isActive()
            for timer in (
                self._save_timer,
                self._recluster_timer,
                self._tiles_timer,
                self._progress_timer,
            ):
                timer.stop()
            self._collector.stop()
        except RuntimeError:  # Qt itself is being torn down (interpreter exit): timers gone
            return
        if pending:  # the widget's status line is gone: a failure goes to napari's notices
            self.save_curation(report=lambda m: show_error(f"HistoCluster: {m} (on closing)"))

    def save_curation(self, report: Callable[[str], None] | None = None) -> None:
        """Write the curation beside its run now (normally done shortly after each edit); a
        failure is shown in the status line, or passed to ``report(message)``."""
        self._save_timer.stop()
        if self._view is None:
            return
        if self._painted is not None and self._view is self._painted:
            self._save_deferred = True  # its run is being written: saved when it is complete
            return
        self._save_deferred = False
        try:
            _session.save_curation(self._view)
        except (HistoclusterError, OSError) as e:
            (report or self._fail)(f"could not save the curation: {e}")

    # ================================================================== canvas

    def _on_mouse_press(self, viewer: Any, event: Any) -> Any:
        """A click (press and release without dragging) on a tile toggles its cluster."""
        yield from on_click(viewer, event, self.click_tile_at)

    def tile_at(self, world_yx: tuple[float, float]) -> tuple[int, int] | None:
        """(row, col) of the shown slide's tile under a world point (um), or None."""
        geom = self._geometry()
        if geom is None:
            return None
        return geom.tile_at(world_yx, self._offset())

    def click_tile_at(self, world_yx: tuple[float, float]) -> int | None:
        """Select (or unselect) the cluster of the tile at ``world_yx``; returns the cluster."""
        tile = self.tile_at(world_yx)
        if tile is None or self._view is None or self._current is None:
            return None
        self._query_tile = tile
        cluster = int(self._view.labels[self._current][tile])
        if cluster < 0:
            self.status.value = f"tile {tile}: no tissue"
            return None
        self.table.toggle(cluster)
        state = "selected" if cluster in self.table.selected() else "unselected"
        name = self._view.curation.name_of(cluster) or "unnamed"
        self.status.value = f"tile {tile}: cluster {cluster} ({name}) {state}"
        return cluster

    def correct_tile_at(self, world_yx: tuple[float, float], action: str) -> tuple[int, int] | None:
        """Per-tile correction of the tile at ``world_yx``: ``move`` (to 'correct to'), ``exclude``, ``restore``."""
        tile = self.tile_at(world_yx)
        if tile is None or self._view is None or self._current is None:
            show_warning("Put the cursor over a tile of the clustered slide")
            return None
        cur, sid = self._view.curation, self._current
        if action == "restore":
            cur.clear_override(sid, *tile)
            self.status.value = f"tile {tile} of {sid}: back to its cluster"
        elif action == "exclude":
            cur.override_tile(sid, *tile, None)
            self.status.value = f"tile {tile} of {sid}: excluded from export"
        else:
            name = self.correction_class.value
            if not name:
                self._fail("Name a cluster first, then pick the class under 'correct to'")
                return None
            cur.override_tile(sid, *tile, name)
            self.status.value = f"tile {tile} of {sid}: moved to {name!r}"
        return tile

    def _find_similar_at_cursor(self, viewer: Any) -> None:
        tile = self.tile_at(tuple(viewer.cursor.position[-2:]))
        if tile is None:
            show_warning("Find similar: put the cursor over a tissue tile of the clustered slide")
            return
        self.find_similar(tile)

    def find_similar(self, tile: tuple[int, int] | None = None) -> Any | None:
        """Find, in a worker, the tiles of the shown slide most similar to ``tile`` (default: the
        last clicked), then mark them and keep them in ``similar_hits`` (row, col, cosine
        similarity). Returns the worker, or None when there is nothing to query.

        The query reads the slide's features from the store (100-200 ms): off the GUI thread.
        A newer query, or another slide shown meanwhile, drops an older one's hits."""
        if self._view is None or self._current is None:
            self._fail("Find similar: cluster a slide first")
            return None
        tile = tile or self._query_tile
        if tile is None:
            self._fail("Find similar: click a tile first, or press Shift-F over one")
            return None
        self._similar_generation += 1
        self.similar_hits = None
        gen, view, sid, bridge = (
            self._similar_generation,
            self._view,
            self._current,
            self._similar_bridge,
        )
        top = int(self.n_similar.value)

        def work() -> None:
            try:
                hits = _session.similar_tiles(view, sid, tile, top)
            except BaseException as e:  # shown in the GUI thread
                bridge.event.emit((gen, sid, tile, None, e))
            else:
                bridge.event.emit((gen, sid, tile, hits, None))

        self.status.value = f"Finding the tiles most similar to tile {tile}…"
        worker = create_worker(in_background(work), _start_thread=False, _ignore_errors=True)
        worker.start()
        return worker

    def _on_similar_found(self, event: tuple) -> None:
        gen, sid, tile, hits, error = event
        if gen != self._similar_generation or self._view is None:
            return  # superseded by a newer query or a new cohort (each says so itself)
        if not _viewer_open(self._viewer):
            return  # closed while the worker ran
        if error is not None:
            self._fail(f"Find similar: {error}")
            return
        if sid != self._current or self._geometry() is None:
            self.status.value = (
                f"Find similar: {sid} is no longer shown, its hits were dropped; show it and "
                "press Shift-F over the tile again."
            )
            return
        image = self._image_layer()
        name = (image.name if image is not None else sid) + SIMILAR_SUFFIX
        tiles = [tile] + [(r, c) for r, c, _ in hits]
        self._draw_outlines("similar", name, tiles, [QUERY] + [HIT] * len(hits))
        self.similar_hits = hits
        self.status.value = (
            f"{len(hits)} tiles most similar to tile {tile} marked (yellow; the query in cyan)."
        )

    def _tile_rect(self, row: int, col: int) -> np.ndarray:
        geom = self._geometry()
        assert geom is not None
        oy, ox = self._offset()
        x0, y0, x1, y1 = geom.tile_bounds_l0(row, col)
        mx, my = geom.mpp
        ys = np.array([y0, y1]) * my - 0.5 * my + oy
        xs = np.array([x0, x1]) * mx - 0.5 * mx + ox
        return np.array([[ys[0], xs[0]], [ys[0], xs[1]], [ys[1], xs[1]], [ys[1], xs[0]]])

    def _draw_outlines(
        self, kind: str, name: str, tiles: list[tuple[int, int]], values: list[int]
    ) -> Labels:
        """Outline the shown slide's ``tiles`` (row, col) in the widget's layer of ``kind``
        (renamed ``name``), each in the colour of its value (``_tile_outlines``)."""
        geom = self._geometry()
        assert geom is not None
        image = self._image_layer()
        layer = self._rect_layers.get(kind)
        if layer is None or layer not in self._viewer.layers:  # the user deleted it
            layer = self._rect_layers[kind] = _outline_layer(self._viewer, name)
        self._use_layer(layer)
        self._outlined.add(kind)
        self._outlined_on[kind] = self._current  # type: ignore[assignment]
        # Redrawn in place: removing a layer and adding another while a Labels layer is
        # drawn can crash vispy on Mesa's llvmpipe (see _swap_image).
        if image is not None and tuple(layer.units) != tuple(image.units[-2:]):
            layer.units = image.units[-2:]
        levels, origin = outline_levels(tiles, values)
        scale, translate = outline_placement(geom, origin)
        oy, ox = self._offset()
        translate = (translate[0] + oy, translate[1] + ox)
        with _refresh_once(layer):  # (each setter would slice and redraw the layer)
            if not layer.visible:
                layer.visible = True  # before the data: napari keeps a hidden layer's extent
            layer.data = levels
            if not np.allclose(layer.scale[-2:], scale):
                layer.scale = scale
            if not np.allclose(layer.translate[-2:], translate):
                layer.translate = translate
        if layer.name != name:
            layer.name = name
        self._keep_above(layer, self.clusters_layer or image)
        self._activate(self.clusters_layer or layer)
        return layer

    # ================================================================== gallery

    def show_gallery(self, cluster: int) -> Any:
        """Fill the gallery with ``cluster``'s tiles across slides (a worker reads them)."""
        if self._view is None or not 0 <= cluster < self._view.k:
            return None
        view = self._view

        def order() -> list[GalleryTile]:
            store = FeatureStore.open(view.store_path)
            return gallery_order(store, view.run, cluster, view.labels)

        return self.fill_gallery(cluster, order)

    def fill_gallery(self, cluster: int | None, order_fn: Any) -> Any:
        """Fill the gallery with the tiles ``order_fn()`` lists (called in a worker), page by page."""
        self._gallery_stop.set()
        self._gallery_generation += 1
        self._gallery_stop = threading.Event()
        self.gallery.clear_tiles(cluster)
        self._gallery_order, self._gallery_next = [], 0
        gen, bridge = self._gallery_generation, self._gallery_bridge

        def work() -> None:
            try:
                bridge.event.emit(("order", gen, order_fn(), None))
            except BaseException as e:
                bridge.event.emit(("end", gen, None, e))

        self._gallery_loading = True
        worker = create_worker(in_background(work), _start_thread=False, _ignore_errors=True)
        worker.start()
        return worker

    def _gallery_more(self) -> None:
        """Read the next page of gallery tiles (on scrolling to the end)."""
        if self._gallery_loading or self._view is None:
            return
        tiles = self._gallery_order[self._gallery_next : self._gallery_next + PAGE]
        if not tiles:
            return
        self._gallery_next += len(tiles)
        gen, stop, bridge = self._gallery_generation, self._gallery_stop, self._gallery_bridge
        store_path = str(self._view.store_path)

        def work() -> None:
            try:
                for tile, rgb in read_gallery(store_path, tiles):
                    if stop.is_set():
                        break
                    bridge.event.emit(("tile", gen, tile, rgb))
                bridge.event.emit(("end", gen, None, None))
            except BaseException as e:
                bridge.event.emit(("end", gen, None, e))

        self._gallery_loading = True
        worker = create_worker(in_background(work), _start_thread=False, _ignore_errors=True)
        worker.start()

    def _on_gallery_event(self, event: tuple) -> None:
        kind, gen, payload, error = event
        if gen != self._gallery_generation:
            return  # an older cluster's tiles
        try:
            self.gallery.objectName()
        except RuntimeError:  # the widget was closed while tiles were read
            return
        if kind == "order":
            self._gallery_order = payload
            self._gallery_loading = False
            self._gallery_more()
        elif kind == "tile":
            self.gallery.add_tile(payload, error)
        else:
            self._gallery_loading = False
            if error is not None and not isinstance(error, Cancelled):
                self._fail(f"gallery: {error}")

    @property
    def gallery_loading(self) -> bool:
        return self._gallery_loading

    @property
    def camera(self) -> Any:
        """The viewer's camera (``viewer.scene.camera`` from napari 0.9, else ``viewer.camera``)."""
        scene = getattr(self._viewer, "scene", None)
        return scene.camera if scene is not None else self._viewer.camera

    def jump_to_tile(self, sid: str, row: int, col: int) -> None:
        """Open slide ``sid`` if needed, centre and zoom on tile (row, col) and outline it.

        The slide, its clusters and the outline are drawn in successive event-loop passes
        (``show_slide``); the camera is set with the slide's image, so it is sliced once, there.
        """
        if self._view is None:
            return
        if sid != self._current:
            if self._cohort is None:
                self._fail(f"{sid}: open its slide to see this tile")
                return
            self._current = sid if sid in self._view.geometry else self._current
            self.show_slide(sid)
        geom = self._geometry()
        if geom is None:
            return
        centre, zoom = self._tile_camera(self._tile_rect(row, col))
        if self._redraw.wanted("image") or self._image_behind():
            self._pending_camera = (centre, zoom)  # set when the slide's pixels are shown
        else:
            camera = self.camera
            camera.center, camera.zoom = centre, zoom  # (no event when already there)
        self._mark = (sid, row, col)
        self._redraw.want("mark")
        self._query_tile = (row, col)
        cluster = int(self._view.labels[sid][row, col])
        self.status.value = f"{sid}, tile ({row}, {col}): cluster {cluster}"

    def _draw_mark(self) -> None:
        """Outline the gallery tile last clicked, when its slide is the one shown; hide the
        outlines drawn on another slide (shown before this one)."""
        self._hide_outlines(but_on=self._current)
        mark = self._mark
        if mark is None or self._view is None or mark[0] != self._current:
            return
        if self._geometry() is not None:
            self._draw_outlines("mark", MARK_LAYER, [mark[1:]], [MARK])

    def _hide_outlines(self, but_on: str | None = None) -> None:
        """Hide the outlines drawn on a slide other than ``but_on`` (all of them when None)."""
        for kind, sid in list(self._outlined_on.items()):
            if but_on is None or sid != but_on:
                del self._outlined_on[kind]
                layer = self._rect_layers.get(kind)
                if layer is not None and layer in self._viewer.layers:
                    _hide(layer)

    def _tile_camera(self, rect: np.ndarray) -> tuple[tuple[float, float], float]:
        """(centre, zoom) of the camera on a tile's outline ``rect`` (4, 2): a quarter of the canvas."""
        centre = rect.mean(axis=0)
        side = float(np.ptp(rect[:, 0]))
        canvas = getattr(self._viewer, "_canvas_size", None) or (600, 600)
        return (float(centre[0]), float(centre[1])), min(canvas) / (4.0 * side)

    # ================================================================== export

    def export_selected(self, _value: Any = None) -> Any:
        """Export the curation (selected named clusters, per-tile corrections) through ``engine.export``."""
        if self._view is None:
            self._fail("Export: cluster a slide first")
            return None
        cur = self._view.curation
        selected = [c for c in range(cur.k) if cur.is_selected(c)]
        if not selected and not cur.n_overrides():
            self._fail("Export: select at least one cluster (tick it in the table or click a tile)")
            return None
        unnamed = [c for c in selected if cur.name_of(c) is None]
        if unnamed:
            self._fail(
                f"Export: cluster(s) {', '.join(map(str, unnamed))} are selected but have no "
                "class name — type one in the 'class name' column"
            )
            return None
        problem = _session.check_names(cur.exported_classes())
        if problem:
            self._fail(f"Export: {problem}")
            return None
        out = self.export_folder("Export")
        if out is None:
            return None
        self.status.value = f"Exporting {', '.join(cur.exported_classes())} to {out}…"
        return self._start(_session.export_curation, self._view, out, on_done=self._show_export)

    def export_folder(self, what: str) -> Path | None:
        """The folder under 'export to'; None (and why, for ``what``) when empty or busy."""
        out_text = self.export_dir.line_edit.value.strip()
        if not out_text:
            self._fail(f"{what}: choose a folder under 'export to'")
            return None
        return None if self.busy else Path(out_text).expanduser()

    def _show_export(self, report: _session.ExportReport) -> None:
        lines = ", ".join(f"{name}: {n}" for name, n in report.per_class.items())
        slides = "; ".join(
            f"{sid} " + ", ".join(f"{c} {n}" for c, n in per.items())
            for sid, per in report.per_slide.items()
        )
        message = f"Exported {report.total} patches to {report.out_dir} ({lines})"
        self.status.value = _html(f"{message}. Per slide: {slides}. " + " ".join(report.warnings))
        show_info(message)
        for warning in report.warnings:
            show_warning(warning)


class _ViewerHooks:
    """The widget's mouse callback and key bindings on the viewer, holding the widget weakly.

    The viewer outlives the widget; once the widget is gone (its dock closed), the hooks remove
    themselves instead of keeping it alive.
    """

    def __init__(self, widget: HistoClusterWidget, viewer: Any) -> None:
        self._widget = weakref.ref(widget)
        self._viewer = weakref.ref(viewer)
        viewer.mouse_drag_callbacks.append(self.on_mouse)
        viewer.bind_key("Shift-F", self.on_find_similar, overwrite=True)
        for key, action in KEYS.items():
            if action != "find similar":
                viewer.bind_key(key, self._correction(action), overwrite=True)

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
        for key in KEYS:
            viewer.bind_key(key, None, overwrite=True)

    def on_mouse(self, viewer: Any, event: Any) -> Any:
        widget = self._alive()
        if widget is not None:
            yield from widget._on_mouse_press(viewer, event) or ()

    def on_find_similar(self, viewer: Any) -> None:
        widget = self._alive()
        if widget is not None:
            widget._find_similar_at_cursor(viewer)

    def _correction(self, action: str) -> Any:
        def on_key(viewer: Any) -> None:
            widget = self._alive()
            if widget is not None:
                widget.correct_tile_at(tuple(viewer.cursor.position[-2:]), action)

        return on_key


@contextmanager
def _not_activated(viewer: Any) -> Iterator[None]:
    """Layers added inside do not become the active layer: the widget's hidden layers, made at
    plugin start, leave the user's selection as it was, and napari skips the selection's events
    (its layer controls switching to the new layer: about a quarter of an add on the GUI thread)."""
    layers = viewer.layers
    before = getattr(layers, "_activate_on_insert", None)
    if before is None:  # a napari without it: added as usual
        yield
        return
    layers._activate_on_insert = False
    try:
        yield
    finally:
        layers._activate_on_insert = before


def _outline_layer(viewer: Any, name: str, **kwargs: Any) -> Labels:
    """A hidden multiscale Labels layer that draws tile outlines (see ``_tile_outlines``)."""
    return _view_labels(
        viewer, blank_outline_levels(), multiscale=True, colormap=outline_colormap(),
        opacity=1.0, name=name, visible=False, **kwargs,
    )  # fmt: skip


#: A Labels layer's overlays used only while painting or drawing a polygon on it.
LABELS_EDIT_OVERLAYS = ("polygon", "brush_stroke")


def _view_labels(viewer: Any, data: Any, **kwargs: Any) -> Labels:
    """Add a Labels layer that is only viewed (not editable), without the visuals of its edit
    overlays: napari builds a visual of each visible overlay when the layer is added (the
    polygon's and the brush stroke's: ~200 ms of shader parsing on the GUI thread); a layer
    that cannot be edited never shows them (``Labels`` enables them in its paint and polygon
    modes only, which a non-editable layer refuses). It is added without becoming the active
    layer (the widget activates the clusters layer itself): a layer made again while napari
    closes the viewer (a redraw pass after its layers were cleared) would otherwise be activated
    after napari's layer controls were torn down (a KeyError in napari's controls stack)."""
    _wait_for_warm_up()
    layer = Labels(data, **kwargs)
    layer.editable = False
    for name in LABELS_EDIT_OVERLAYS:
        overlay = layer._overlays.get(name)
        if overlay is not None:
            overlay.visible = False
    with _not_activated(viewer):
        viewer.add_layer(layer)
    return layer


@contextmanager
def _refresh_once(layer: Any) -> Iterator[None]:
    """Inside, the layer's setters do not slice it (napari's ``_block_refresh``); it is sliced
    and redrawn once at the end. Where this napari lacks it, each setter refreshes as usual."""
    block = getattr(layer, "_block_refresh", None)
    if block is None:
        yield
        return
    with block():
        yield
    layer.refresh()


def _hide(layer: Any) -> None:
    """Hide a layer (setting ``visible`` emits napari's events even when it does not change)."""
    if layer.visible:
        layer.visible = False


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _number_box(
    label: str, value_min_max_step: tuple[float, float, float, float], tooltip: str, **kw: Any
) -> FloatSpinBox:
    """A labelled float spin box: (value, min, max, step) and what it means."""
    value, lo, hi, step = value_min_max_step
    return FloatSpinBox(label=label, value=value, min=lo, max=hi, step=step, tooltip=tooltip, **kw)


#: Loaded by the warm-up thread before the widget's first layers: what napari's first Image,
#: Labels and Points layers import (scipy.ndimage for an image's thumbnail, pandas for a
#: layer's features, skimage.color for the default label colours: ~1.5 s on the GUI thread).
WARM_UP_MODULES = (
    "scipy.ndimage",
    "pandas",
    "skimage.color.colorconv",  # skimage.color alone is lazy: napari's label colours load this
    "napari.components.histogram",
)
WAIT_FOR_WARM_UP = "wait for the warm-up thread"
WARM_UP_POLL_MS = 20


def _warm_up() -> None:
    """Start, once, the thread that loads in the background what the widget's first layers need:
    napari's unit registry (pint: ~0.5 s) and the modules of ``WARM_UP_MODULES``; label colours
    mapped with numpy (``_numpy_label_colours``). The widget's start passes wait for it (polling) before
    they make layers, so it never competes with a pass for the GIL; a layer made earlier waits
    for it (``_wait_for_warm_up``: two threads building the unit registry at once race)."""
    global _WARMING
    if _WARMING is not None:
        return

    def warm() -> None:
        import importlib

        try:
            from napari.utils._units import get_unit_registry

            get_unit_registry().Unit("um")
        except (ImportError, AttributeError):  # a napari without it: its first layer loads it
            pass
        for name in WARM_UP_MODULES:
            try:
                importlib.import_module(name)
            except Exception:  # only a head start; napari imports what it needs
                pass

    _numpy_label_colours()
    _WARMING = threading.Thread(
        target=in_background(warm), name="histocluster-warm-up", daemon=True
    )
    _WARMING.start()


def _viewer_open(viewer: Any) -> bool:
    """False once the viewer was closed (``Viewer.close`` drops it from the viewers napari keeps
    track of; a test's viewer fixture closes it while the widget's start passes may still run)."""
    instances = getattr(type(viewer), "_instances", None)
    return instances is None or viewer in instances


def _freeze_once(when: str) -> None:
    """``gc.freeze()`` once per process at each point ``when``: the objects alive then (modules,
    the viewer, the widget's layers) are never scanned by a full collection again. Once only:
    a second widget (a new viewer in the same process) would freeze the first one's garbage."""
    if when not in _FROZEN:
        _FROZEN.add(when)
        gc.freeze()


_FROZEN: set[str] = set()


def _numpy_label_colours() -> None:
    """Map label values to colours with numpy, not numba, unless the user chose a backend.

    napari's default ("fastest available") compiles a numba typed dict for the first label
    colour map of the process: 1.3 s, holding the GIL up to 240 ms at a time (a freeze even in
    a background thread). The widget's label images are uint8 (uint16 past 253 clusters), whose
    colours napari maps once per colour map, over every possible value: 1-2 ms with numpy."""
    try:
        from napari.utils.colormap_backend import ColormapBackend, get_backend, set_backend
    except ImportError:  # an older napari: numba when installed, as before
        return
    if get_backend() == ColormapBackend.fastest_available:
        set_backend(ColormapBackend.pure_python)


def _warming() -> bool:
    """True while the warm-up thread runs."""
    return _WARMING is not None and _WARMING.is_alive()


def _wait_for_warm_up() -> None:
    """Start the warm-up if not yet started and wait for its end (at once when it has ended)."""
    _warm_up()
    assert _WARMING is not None
    _WARMING.join()


_WARMING: threading.Thread | None = None
