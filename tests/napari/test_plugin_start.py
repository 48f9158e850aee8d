"""Plugin start in short passes: the panels below the run box and each layer's controls are made
in event-loop passes of their own, and end up as napari and the user expect."""

from __future__ import annotations

from contextlib import contextmanager

from qtpy.QtWidgets import QApplication

from histocluster_napari._held_controls import HeldControls
from histocluster_napari._widget import HistoClusterWidget, _not_activated
from tests.napari.test_widget import TIMEOUT_MS


def _controls(viewer):
    return viewer.window._qt_viewer.controls


@contextmanager
def _raising_callback_errors(viewer):
    """An error in a callback of the layer list's removal is raised, as at napari's teardown in
    pytest (elsewhere napari prints it and goes on)."""
    removed = viewer.layers.events.removed
    before = removed.ignore_callback_errors
    removed.ignore_callback_errors = False
    try:
        yield
    finally:
        removed.ignore_callback_errors = before


def test_held_controls_are_made_in_the_next_step(make_napari_viewer):
    viewer = make_napari_viewer()
    held = HeldControls(viewer)
    first = viewer.add_points([[0.0, 0.0]], name="first")
    with _not_activated(viewer), held.hold():  # as the widget inserts its layers
        layer = viewer.add_points([[1.0, 2.0]], name="held")
    assert layer not in _controls(viewer).widgets  # napari's insert made none
    assert held.pending == 1
    held.make()
    assert layer in _controls(viewer).widgets
    viewer.layers.selection.active = layer
    QApplication.processEvents()
    assert _controls(viewer).currentWidget() is _controls(viewer).widgets[layer]
    # made active before make(): its controls are made then, and napari shows them
    with held.hold():
        activated = viewer.add_points([[2.0, 2.0]], name="activated")  # napari activates it
    assert viewer.layers.selection.active is activated
    assert _controls(viewer).currentWidget() is _controls(viewer).widgets[activated]
    assert held.pending == 0
    viewer.layers.selection.active = first
    # a layer removed before its controls were made (the viewer closed between the passes):
    # napari's controls stack finds controls to remove, make() skips it, nothing else is held
    with _not_activated(viewer), held.hold():
        gone = viewer.add_points([[3.0, 4.0]], name="gone")
    assert gone not in _controls(viewer).widgets
    with _raising_callback_errors(viewer):
        viewer.layers.remove(gone)
    held.make()
    assert gone not in _controls(viewer).widgets
    assert held.pending == 0
    after = viewer.add_points([[5.0, 6.0]], name="after")
    assert after in _controls(viewer).widgets  # outside hold(): napari's own way


def test_every_widget_layer_has_its_controls_after_start(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    qtbot.waitUntil(lambda: widget.layers_ready, timeout=TIMEOUT_MS)
    names = [name for name, _ in widget.start_passes]
    assert "slide layer: controls" in names
    assert len(viewer.layers) == 4
    assert all(layer in _controls(viewer).widgets for layer in viewer.layers)


def test_the_panels_below_the_run_box_come_in_later_passes_in_order(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    assert "classifier" not in widget.__dict__  # made after the dock's first paint
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    qtbot.waitUntil(lambda: widget.layers_ready, timeout=TIMEOUT_MS)
    layout = widget.body.layout()
    order = [layout.itemAt(i).widget() for i in range(layout.count())]
    expected = [widget.table, widget._actions.native, widget.classifier.native]
    expected += [widget.map_panel.native, widget.gallery]
    at = [next(i for i, w in enumerate(order) if w is e) for e in expected]
    assert at == sorted(at) and at[0] > order.index(widget._run_box.native)


def test_a_panel_asked_for_early_is_made_then_with_those_above_it(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = HistoClusterWidget(viewer)
    assert widget.map_panel is not None  # asked for before its pass
    assert {"table", "classifier", "map_panel", "gallery"} <= set(widget.__dict__)
    layout = widget.body.layout()
    order = [layout.itemAt(i).widget() for i in range(layout.count())]
    assert order.index(widget.classifier.native) < order.index(widget.map_panel.native)
    assert widget.gallery not in order  # laid out in its own pass, below the map
    widget.native.close()


def test_the_dock_fits_a_laptop_screen_and_scrolls(make_napari_viewer, qtbot):
    viewer = make_napari_viewer(show=True)
    widget = HistoClusterWidget(viewer)
    viewer.window.add_dock_widget(widget, name="HistoCluster")
    qtbot.waitUntil(lambda: widget.layers_ready, timeout=TIMEOUT_MS)
    window = viewer.window._qt_window
    window.resize(1366, 768)
    qtbot.wait(200)
    # the sections stacked are taller than the screen: they scroll, the window is not taller
    assert widget.body.sizeHint().height() > 768
    assert window.height() <= 768
    assert viewer.window._qt_viewer.canvas.native.width() >= 400  # the slide stays in view
    assert widget.body.width() >= widget.body.minimumSizeHint().width()  # no section cut
    scroll = widget.body.parentWidget().parentWidget()
    assert scroll.verticalScrollBar().maximum() > 0
    scroll.ensureWidgetVisible(widget.gallery)  # the last section, reached by scrolling
    qtbot.wait(50)
    top = widget.gallery.mapTo(scroll.viewport(), widget.gallery.rect().topLeft()).y()
    assert 0 <= top < scroll.viewport().height()
