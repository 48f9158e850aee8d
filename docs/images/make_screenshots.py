"""Take the README's two screenshots: the sample slide with clusters over it, and the widget.

    xvfb-run -a -s "-screen 0 2000x1100x24" .venv/bin/python docs/images/make_screenshots.py

Runs the demo (``histocluster_napari.demo``), clicks Cluster, names the clusters whose exemplars
are the two marker inks, selects them, and saves ``clusters.png`` (the canvas) and
``widget.png`` (the dock widget) beside this file.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NAPARI_ASYNC", "1")
OUT = Path(__file__).resolve().parent


def main() -> int:
    import numpy as np
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from histocluster_napari.demo import DemoConfig, open_demo

    viewer, widget = open_demo(DemoConfig())
    viewer.window._qt_window.resize(1900, 1000)
    viewer.window.show()
    app = QApplication.instance()

    def spin(seconds: float, until=None) -> None:
        end = time.time() + seconds
        while time.time() < end and not (until and until()):
            app.processEvents()
            time.sleep(0.02)

    widget.run_cluster()
    spin(3600, lambda: not widget.busy)
    view = widget._view
    if view is None:
        print(widget.status.value, file=sys.stderr)
        return 1
    # Name the clusters whose exemplars are most green / most blue: the two marker inks.
    mean = np.array([np.mean([t.mean(axis=(0, 1)) for t in row], axis=0) for row in view.exemplars])
    green = int(np.argmax(mean[:, 1] - mean[:, [0, 2]].max(axis=1)))
    blue = int(np.argmax(mean[:, 2] - mean[:, 0] - (np.arange(len(mean)) == green) * 1e3))
    widget.table.set_name(green, "green_ink")
    widget.table.set_name(blue, "blue_ink")
    widget.table.set_selected([green, blue])
    viewer.layers.selection.active = viewer.layers[0]
    viewer.reset_view()
    spin(3)
    shot = viewer.export_figure(scale_factor=1200 / 5376, flash=False)  # the slide, no margins
    Image.fromarray(shot).save(OUT / "clusters.png")
    widget.native.grab().save(str(OUT / "widget.png"))
    viewer.close()
    print(f"wrote {OUT / 'clusters.png'} and {OUT / 'widget.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
