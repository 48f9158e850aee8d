"""The cohort slide list: rows replaced in place, the highlighted slide kept."""

from __future__ import annotations

from pathlib import Path

import pytest
from qtpy.QtWidgets import QHeaderView

from histocluster_napari._cohort import SlideRow
from histocluster_napari._slide_list import SlideList

pytestmark = pytest.mark.gui


def rows(n: int, counts: bool = False) -> list[SlideRow]:
    return [
        SlideRow(Path(f"/cohort/s{i:02d}.svs"), f"s{i:02d}", 100 + i if counts else None, None)
        for i in range(n)
    ]


def texts(w: SlideList) -> list[list[str]]:
    return [[w.item(r, c).text() for c in range(w.columnCount())] for r in range(w.rowCount())]


def test_new_counts_change_only_their_cells_and_keep_the_highlight(qtbot):
    w = SlideList()
    qtbot.addWidget(w)
    w.set_rows(rows(5))
    w.highlight("s03")
    name_item, status_item = w.item(2, 0), w.item(2, 3)
    w.set_rows(rows(5, counts=True))
    assert [t[1] for t in texts(w)] == [str(100 + i) for i in range(5)]
    assert w.item(2, 0) is name_item  # the name did not change: the same cell
    assert w.item(2, 0).toolTip() == str(Path("/cohort/s02.svs"))
    assert w.item(2, 3) is status_item and w.status_of("s02") == rows(5, True)[2].status
    assert w.current() == "s03"
    # fewer slides: the rows go, the columns fit their contents again
    w.set_rows(rows(2, counts=True))
    assert w.rowCount() == 2 and w.slide_ids() == ["s00", "s01"]
    header = w.horizontalHeader()
    assert all(
        header.sectionResizeMode(c) == QHeaderView.ResizeMode.ResizeToContents for c in (1, 2, 3)
    )
