"""Filling the widget's cohort slide list, for cohorts of 20 to 1,000 slides.

    QT_QPA_PLATFORM=xcb xvfb-run -a .venv/bin/python benchmarks/slide_list.py [--sizes 20 200 1000]

Times ``SlideList.set_rows`` on the GUI thread, twice per size: the names (a folder opened), then
the same rows with counts (what the widget shows after each slide is extracted), plus the
events processed after each. Side by side in one run: the list as it is (columns fitted to their
contents once, after the rows are filled) and with its columns left fitting to their contents
while the rows are filled (``_fit_columns`` a no-op: how the list filled before), which measures
every row again on each cell set.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def fill_ms(app, rows_a, rows_b, fit_while_filling: bool) -> tuple[float, float]:
    """(ms, ms): ``set_rows(rows_a)`` on a new shown list, then ``set_rows(rows_b)``, each with
    the events processed after it."""
    from histocluster_napari._slide_list import SlideList

    w = SlideList()
    if fit_while_filling:
        w._fit_columns = lambda on: None  # columns stay fitted to their contents meanwhile
    w.show()
    app.processEvents()
    out = []
    for rows in (rows_a, rows_b):
        t0 = time.perf_counter()
        w.set_rows(rows)
        app.processEvents()
        out.append(1000 * (time.perf_counter() - t0))
    w.close()
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 200, 1000])
    a = p.parse_args(argv)
    from qtpy.QtWidgets import QApplication

    from histocluster_napari._cohort import SlideRow

    app = QApplication.instance() or QApplication([])
    print(
        f"{'slides':>7} {'names ms':>9} {'before':>9} {'counts ms':>10} {'before':>9} {'ratio':>7}"
    )
    for n in a.sizes:
        names = [SlideRow(Path(f"/cohort/s{i:04d}.svs"), f"s{i:04d}", None, None) for i in range(n)]
        counts = [SlideRow(r.path, r.slide_id, 1000 + i, i) for i, r in enumerate(names)]
        now = fill_ms(app, names, counts, fit_while_filling=False)
        before = fill_ms(app, names, counts, fit_while_filling=True)
        print(
            f"{n:>7} {now[0]:>9.1f} {before[0]:>9.1f} {now[1]:>10.1f} {before[1]:>9.1f} "
            f"{before[1] / now[1]:>6.0f}x",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
