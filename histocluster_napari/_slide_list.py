"""The cohort's slide list in the HistoCluster widget: slide, tissue tiles, encoded tiles, status."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QProgressBar,
    QTableWidget,
    QTableWidgetItem,
)

from histocluster_napari._cohort import SlideRow

HEADERS = ("slide", "tissue tiles", "encoded", "status")
FIT_ROWS = 200
"""Rows measured to fit a column to its contents (Qt's default: 1,000; the visible rows always)."""
SHOWN_ROWS = 8
"""Rows the list's size hint makes room for (more scroll)."""


class SlideList(QTableWidget):
    """One row per slide of the cohort; emits ``slide_chosen(slide_id)`` when a row is clicked.

    While slides are extracted, each one with tiles to encode shows its own progress bar in the
    status column (``set_progress``).
    """

    slide_chosen = Signal(str)

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(HEADERS), parent)
        self.setHorizontalHeaderLabels(HEADERS)
        self.verticalHeader().setVisible(False)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        header = self.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self._fit_columns(True)
        header.setResizeContentsPrecision(FIT_ROWS)
        self.setMinimumHeight(90)
        self._ids: list[str] = []
        self._bars: dict[str, QProgressBar] = {}
        self.cellClicked.connect(lambda row, _col: self.slide_chosen.emit(self._ids[row]))

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """As tall as its rows, up to ``SHOWN_ROWS`` (more scroll), so the dock's sections
        below it are not pushed down by empty rows."""
        rows = min(max(self.rowCount(), 1), SHOWN_ROWS)
        height = self.horizontalHeader().sizeHint().height()
        height += rows * self.verticalHeader().defaultSectionSize() + 2 * self.frameWidth()
        return QSize(super().sizeHint().width(), max(height, self.minimumHeight()))

    def _fit_columns(self, on: bool) -> None:
        """Columns 1-3 sized to their contents (on), or left as they are while rows are filled:
        a column fitted to its contents measures every row again on each cell changed, so
        filling n rows costs n^2 (1,000 slides: 7.1 s, ``benchmarks/slide_list.py``)."""
        mode = QHeaderView.ResizeMode.ResizeToContents if on else QHeaderView.ResizeMode.Interactive
        for col in (1, 2, 3):
            self.horizontalHeader().setSectionResizeMode(col, mode)

    def set_rows(self, rows: Sequence[SlideRow]) -> None:
        """Show ``rows`` (keeps the highlighted slide when it is still listed); cells whose text
        is unchanged are left alone."""
        current = self.current()
        self._ids = [r.slide_id for r in rows]
        self._fit_columns(False)
        self.setUpdatesEnabled(False)
        try:
            if len(rows) != self.rowCount():
                self.setRowCount(len(rows))
                self.updateGeometry()  # (its size hint follows its rows)
            for i, r in enumerate(rows):
                cells = (
                    r.slide_id,
                    "" if r.tissue is None else str(r.tissue),
                    "" if r.encoded is None else str(r.encoded),
                    r.status,
                )
                for col, text in enumerate(cells):
                    self._set_cell(i, col, text, str(r.path) if col == 0 else None)
        finally:
            self._fit_columns(True)  # measured once, over the first FIT_ROWS rows
            self.setUpdatesEnabled(True)
        if current in self._ids:
            self.highlight(current)

    def _set_cell(self, row: int, col: int, text: str, tooltip: str | None) -> None:
        item = self.item(row, col)
        if item is None:
            item = QTableWidgetItem(text)
            if col in (1, 2):
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.setItem(row, col, item)
        elif item.text() != text:
            item.setText(text)
        if tooltip is not None and item.toolTip() != tooltip:
            item.setToolTip(tooltip)

    def set_progress(self, counts: dict[str, tuple[int, int]]) -> None:
        """Show (tiles done, tiles to do) of each slide in ``counts`` as a bar in its status cell.

        A slide's bar is made when its first tiles are done (slides waiting their turn keep
        their status text), so a cohort's bars appear one at a time, not all at once.
        """
        for sid, (done, total) in counts.items():
            if sid not in self._ids:
                continue
            bar = self._bars.get(sid)
            if bar is None:
                if done <= 0:
                    continue
                bar = self._bars[sid] = QProgressBar()
                bar.setFormat("encoding %v / %m")
                bar.setTextVisible(True)
                self.setCellWidget(self._ids.index(sid), 3, bar)
            set_bar(bar, done, total)

    def progress(self) -> dict[str, tuple[int, int]]:
        """(done, to do) of each slide whose progress bar is shown."""
        return {s: (b.value(), b.maximum()) for s, b in self._bars.items()}

    def clear_progress(self) -> None:
        """Remove the per-slide progress bars (the status column shows the counts again)."""
        for sid in self._bars:
            if sid in self._ids:
                self.removeCellWidget(self._ids.index(sid), 3)
        self._bars.clear()

    def slide_ids(self) -> list[str]:
        return list(self._ids)

    def highlight(self, slide_id: str) -> None:
        """Mark ``slide_id``'s row as the slide shown (emits nothing)."""
        if slide_id in self._ids:
            self.blockSignals(True)
            self.selectRow(self._ids.index(slide_id))
            self.blockSignals(False)

    def current(self) -> str | None:
        rows = self.selectionModel().selectedRows() if self.selectionModel() else []
        return self._ids[rows[0].row()] if rows and rows[0].row() < len(self._ids) else None

    def status_of(self, slide_id: str) -> str:
        return self.item(self._ids.index(slide_id), 3).text()


def set_bar(bar: QProgressBar, value: int, maximum: int) -> None:
    """Set a progress bar's range and value, drawn with the window's next paint.

    ``QProgressBar.setValue`` repaints at once (synchronously) when its text shows; in a window
    holding napari's OpenGL canvas each such repaint composes the whole window. With updates
    off while the value changes, the bar is only marked for the next (coalesced) paint.
    """
    maximum = max(1, int(maximum))
    if bar.maximum() == maximum and bar.value() == min(int(value), maximum):
        return
    bar.setUpdatesEnabled(False)
    try:
        bar.setMaximum(maximum)
        bar.setValue(min(int(value), maximum))
    finally:
        bar.setUpdatesEnabled(True)  # schedules one update()
