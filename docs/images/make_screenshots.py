"""Take the README's screenshots: the sample slide with clusters over it, the widget, a cohort
and the gallery of a cluster across its slides.

    xvfb-run -a -s "-screen 0 2000x1100x24" .venv/bin/python docs/images/make_screenshots.py

Runs the demo (``histocluster_napari.demo``), clicks Cluster, names the clusters whose exemplars
are the two marker inks, selects them, and saves ``clusters.png`` (the canvas) and
``widget.png`` (the dock widget). Then opens a cohort -- the sample slide, a second generated
slide (``sample_data/make_sample_slide.py --seed 1``, half size) and, when ``../shared/data`` is
there, the real ``CMU-1-Small-Region.svs`` -- clusters it once, names the green ink, shows its
gallery and saves ``cohort.png`` (the whole window) and ``gallery.png`` (the gallery). Then
names every other cluster ``tissue``, trains the classifier and saves ``classifier.png`` (the
window with the predicted classes over the slide), and opens the map (a second viewer) and
saves ``map.png``.
Everything is written beside this file; ``--skip-single`` takes only the cohort pictures.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NAPARI_ASYNC", "1")
OUT = Path(__file__).resolve().parent
REPO = OUT.parent.parent
CMU = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _spin(seconds: float, until=None) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.time() + seconds
    while time.time() < end and not (until and until()):
        app.processEvents()
        time.sleep(0.02)


def _ink_clusters(exemplars) -> tuple[int, int]:
    """The clusters whose exemplars are most green and most blue: the two marker inks."""
    import numpy as np

    mean = np.array(
        [
            np.mean([t.mean(axis=(0, 1)) for t in row], axis=0) if row else np.zeros(3)
            for row in exemplars
        ]
    )
    green = int(np.argmax(mean[:, 1] - mean[:, [0, 2]].max(axis=1)))
    blue = int(np.argmax(mean[:, 2] - mean[:, 0] - (np.arange(len(mean)) == green) * 1e3))
    return green, blue


def single_slide() -> int:
    from PIL import Image

    from histocluster_napari.demo import DemoConfig, open_demo

    viewer, widget = open_demo(DemoConfig())
    viewer.window._qt_window.resize(1900, 1000)
    viewer.window.show()
    widget.run_cluster()
    _spin(3600, lambda: not widget.busy)
    view = widget.view
    if view is None:
        print(widget.status.value, file=sys.stderr)
        return 1
    green, blue = _ink_clusters(view.exemplars)
    widget.table.set_name(green, "green_ink")
    widget.table.set_name(blue, "blue_ink")
    widget.table.set_selected([green, blue])
    viewer.layers.selection.active = viewer.layers[0]
    viewer.reset_view()
    _spin(3)
    shot = viewer.export_figure(scale_factor=1200 / 5376, flash=False)  # the slide, no margins
    Image.fromarray(shot).save(OUT / "clusters.png")
    widget.body.grab().save(str(OUT / "widget.png"))
    viewer.close()
    print(f"wrote {OUT / 'clusters.png'} and {OUT / 'widget.png'}")
    return 0


def cohort() -> int:
    import napari

    from engine.sample_data import sample_slide_path
    from histocluster_napari._widget import HistoClusterWidget

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cohort"
        folder.mkdir()
        subprocess.run(
            [sys.executable, str(REPO / "sample_data" / "make_sample_slide.py"), "--out-dir", tmp,
             "--seed", "1", "--width", "2688", "--height", "2016", "--name", "second_slide",
             "--quiet"],
            check=True,
        )  # fmt: skip
        sources = [sample_slide_path(), Path(tmp) / "second_slide.tiff"]
        sources += [CMU] if CMU.is_file() else []
        for src in sources:
            (folder / src.name).symlink_to(src)
        viewer = napari.Viewer(title="histocluster — cohort")
        viewer.window._qt_window.resize(1900, 1050)
        widget = HistoClusterWidget(viewer)
        viewer.window.add_dock_widget(widget, name="HistoCluster")
        widget.store.value = str(Path(tmp) / "cohort.zarr")
        widget.target_mpp.value = 1.0
        widget.open_folder(folder)
        viewer.window.show()
        viewer.window._qt_window.resize(1900, 1050)
        widget.run_cluster()
        _spin(3600, lambda: not widget.busy)
        view = widget.view
        if view is None:
            print(widget.status.value, file=sys.stderr)
            return 1
        green, blue = _ink_clusters(view.exemplars)
        widget.table.set_name(green, "green_ink")
        widget.table.set_name(blue, "blue_ink")
        widget.table.set_selected([green, blue])
        widget.show_slide("sample_slide")
        widget.table.cellClicked.emit(green, 1)
        want = min(24, int(view.totals[green]))
        _spin(600, lambda: widget.gallery.count() >= want and not widget.gallery_loading)
        _spin(2)
        viewer.window._qt_window.grab().save(str(OUT / "cohort.png"))
        widget.gallery.grab().save(str(OUT / "gallery.png"))
        print(f"wrote {OUT / 'cohort.png'} and {OUT / 'gallery.png'}")
        status = classifier_and_map(viewer, widget, (green, blue))
        viewer.close()
    return status


def classifier_and_map(viewer, widget, inks: tuple[int, int]) -> int:
    """Train the classifier (inks vs tissue) and open the map: classifier.png, map.png."""
    import napari

    view = widget.view
    for c in range(view.k):
        if c not in inks:
            widget.table.set_name(c, "tissue")
    widget.classifier.train()
    _spin(3600, lambda: not widget.busy)
    if widget.classifier.prediction is None:
        print(widget.status.value, file=sys.stderr)
        return 1
    widget.show_slide("sample_slide")
    _spin(2)
    viewer.window._qt_window.grab().save(str(OUT / "classifier.png"))
    map_viewer = napari.Viewer(title="HistoCluster map")
    map_viewer.window._qt_window.resize(1100, 1000)
    widget.map_panel.open_map(map_viewer)
    _spin(3600, lambda: not widget.busy)
    if widget.map_panel.map is None:
        print(widget.status.value, file=sys.stderr)
        return 1
    map_viewer.reset_view()
    _spin(2)
    map_viewer.window._qt_window.grab().save(str(OUT / "map.png"))
    map_viewer.close()
    print(f"wrote {OUT / 'classifier.png'} and {OUT / 'map.png'}")
    return 0


def main() -> int:
    from histocluster_napari._triton_guard import block_triton

    block_triton()  # a GUI process: see histocluster_napari/_triton_guard.py
    if "--skip-single" not in sys.argv and single_slide():
        return 1
    return cohort()


if __name__ == "__main__":
    sys.exit(main())
