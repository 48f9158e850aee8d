"""The cluster table of the HistoCluster widget: colour, class name, count, share, exemplars, select."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QColor, QImage, QPixmap
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QLabel, QTableWidget, QTableWidgetItem

THUMB_PX = 44
"""Side of an exemplar thumbnail in the table, in screen pixels."""
NAME_PX = 140
"""The class-name column's width in the table's size hint."""

COL_SELECT, COL_NAME, COL_COUNT, COL_SLIDE, COL_SHARE, COL_EXEMPLARS = range(6)
HEADERS = ("cluster", "class name", "tiles", "this slide", "share", "nearest the centre")


def exemplar_strip(thumbs: Sequence[np.ndarray], px: int = THUMB_PX, gap: int = 2) -> np.ndarray:
    """Thumbnails (h, w, 3) uint8 resized to ``px`` and laid side by side: (px, n*px+gaps, 3) uint8."""
    n = max(1, len(thumbs))
    strip = np.full((px, n * px + (n - 1) * gap, 3), 255, np.uint8)
    for i, t in enumerate(thumbs):
        img = Image.fromarray(np.ascontiguousarray(t[..., :3])).resize(
            (px, px), Image.Resampling.BILINEAR
        )
        strip[:, i * (px + gap) : i * (px + gap) + px] = np.asarray(img)
    return strip


def rgb_pixmap(rgb: np.ndarray) -> QPixmap:
    rgb = np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    image = QImage(rgb.data, w, h, 3 * w, QImage.Format.Format_RGB888)
    return QPixmap.fromImage(image.copy())  # copy: the QImage must not outlive ``rgb``


class ClusterTable(QTableWidget):
    """One row per cluster. Emits ``selection_changed`` with the sorted selected cluster ids and
    ``name_edited(cluster, text)`` when the user edits a class name. ``tiles`` and ``share`` are
    over the whole cohort, ``this slide`` over the slide shown."""

    selection_changed = Signal(list)
    name_edited = Signal(int, str)

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(HEADERS), parent)
        self.setHorizontalHeaderLabels(HEADERS)
        self.verticalHeader().setVisible(False)
        self.setSelectionMode(QAbstractItemView.SelectionMode.NoSelection)
        header = self.horizontalHeader()
        for col in (COL_SELECT, COL_COUNT, COL_SLIDE, COL_SHARE, COL_EXEMPLARS):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(COL_NAME, QHeaderView.ResizeMode.Stretch)
        header.setMinimumSectionSize(24)
        self.setWordWrap(False)
        self.verticalHeader().setDefaultSectionSize(THUMB_PX + 6)
        self.setMinimumHeight(3 * (THUMB_PX + 6) + 30)
        self._updating = False
        self.itemChanged.connect(self._on_item_changed)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        """Wide enough for every column and a class name of ``NAME_PX``; rows of six clusters
        (the dock scrolls): the dock takes its width from this."""
        header = self.horizontalHeader()
        widths = [
            max(header.sectionSizeHint(c), self.sizeHintForColumn(c))
            for c in range(self.columnCount())
            if c != COL_NAME
        ]
        width = sum(widths) + NAME_PX + self.verticalScrollBar().sizeHint().width()
        height = header.sizeHint().height() + 6 * (THUMB_PX + 6)
        return QSize(width + 2 * self.frameWidth(), height + 2 * self.frameWidth())

    # ------------------------------------------------------------------ filling

    def set_clusters(
        self,
        colors: np.ndarray,
        counts: np.ndarray,
        exemplars: Sequence[Sequence[np.ndarray]] | None = None,
        names: Sequence[str | None] = (),
        selected: Sequence[int] = (),
        slide_counts: np.ndarray | None = None,
    ) -> None:
        """Show ``k`` clusters: ``colors`` (k, 4) float RGBA in [0, 1], ``counts`` (k,) tiles each.

        ``names`` (k,) class names (None or missing: unnamed) come from the run's curation, never
        from the rows shown before; ``slide_counts`` (k,) the current slide's tiles.
        """
        k = len(counts)
        total = max(1, int(np.sum(counts)))
        names = [(names[i] if i < len(names) else None) or "" for i in range(k)]
        self._updating = True
        try:
            self.setRowCount(k)
            for i in range(k):
                check = QTableWidgetItem(f" {i}")  # tick box + the cluster's colour and number
                check.setFlags(Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled)
                check.setCheckState(
                    Qt.CheckState.Checked if i in selected else Qt.CheckState.Unchecked
                )
                r, g, b = (int(round(255 * v)) for v in colors[i][:3])
                check.setBackground(QColor(r, g, b))
                check.setForeground(
                    QColor(0, 0, 0)
                    if (0.299 * r + 0.587 * g + 0.114 * b) > 140
                    else QColor(255, 255, 255)
                )
                check.setToolTip(f"select cluster {i} (or click one of its tiles on the slide)")
                self.setItem(i, COL_SELECT, check)
                name = QTableWidgetItem(names[i])
                name.setFlags(Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsEditable)
                name.setToolTip(
                    "class name: the export folder of this cluster's tiles (double-click to edit; "
                    "empty = unnamed, never exported)"
                )
                self.setItem(i, COL_NAME, name)
                count = QTableWidgetItem(str(int(counts[i])))
                count.setFlags(Qt.ItemFlag.ItemIsEnabled)
                count.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(i, COL_COUNT, count)
                here = QTableWidgetItem("")
                here.setFlags(Qt.ItemFlag.ItemIsEnabled)
                here.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(i, COL_SLIDE, here)
                share = QTableWidgetItem(f"{100.0 * counts[i] / total:.1f} %")
                share.setFlags(Qt.ItemFlag.ItemIsEnabled)
                share.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                self.setItem(i, COL_SHARE, share)
                label = QLabel()
                if exemplars is not None and len(exemplars[i]):
                    label.setPixmap(rgb_pixmap(exemplar_strip(exemplars[i])))
                self.setCellWidget(i, COL_EXEMPLARS, label)
        finally:
            self._updating = False
        self.set_slide_counts(slide_counts)
        self.resizeColumnsToContents()
        self.selection_changed.emit(self.selected())

    def set_slide_counts(self, counts: np.ndarray | None) -> None:
        """Fill the ``this slide`` column with ``counts`` (k,) (blank when None)."""
        self._updating = True
        try:
            for i in range(self.rowCount()):
                text = "" if counts is None or i >= len(counts) else str(int(counts[i]))
                self.item(i, COL_SLIDE).setText(text)
        finally:
            self._updating = False

    def set_names(self, names: Sequence[str | None]) -> None:
        """Show ``names`` (k,) without emitting ``name_edited``."""
        self._updating = True
        try:
            for i, name in enumerate(names[: self.rowCount()]):
                self.item(i, COL_NAME).setText(name or "")
        finally:
            self._updating = False

    # ------------------------------------------------------------------ state

    def selected(self) -> list[int]:
        """Ids of the checked clusters, ascending."""
        return [
            i
            for i in range(self.rowCount())
            if self.item(i, COL_SELECT) is not None
            and self.item(i, COL_SELECT).checkState() == Qt.CheckState.Checked
        ]

    def set_selected(self, ids: Sequence[int]) -> None:
        """Check exactly the clusters ``ids``."""
        wanted = {int(i) for i in ids}
        self._updating = True
        try:
            for i in range(self.rowCount()):
                state = Qt.CheckState.Checked if i in wanted else Qt.CheckState.Unchecked
                self.item(i, COL_SELECT).setCheckState(state)
        finally:
            self._updating = False
        self.selection_changed.emit(self.selected())

    def toggle(self, cluster: int) -> None:
        """Check or uncheck one cluster."""
        sel = set(self.selected())
        sel ^= {int(cluster)}
        self.set_selected(sorted(sel))

    def names(self) -> list[str]:
        """Class name of every cluster as shown, in cluster order ("" = unnamed)."""
        return [
            self.item(i, COL_NAME).text() if self.item(i, COL_NAME) is not None else ""
            for i in range(self.rowCount())
        ]

    def set_name(self, cluster: int, name: str) -> None:
        """Type ``name`` into a cluster's name cell, as the user would (emits ``name_edited``)."""
        self.item(cluster, COL_NAME).setText(name)

    def exemplar_pixmap(self, cluster: int) -> QPixmap | None:
        widget = self.cellWidget(cluster, COL_EXEMPLARS)
        return widget.pixmap() if isinstance(widget, QLabel) else None

    def _on_item_changed(self, item: QTableWidgetItem) -> None:
        if self._updating:
            return
        if item.column() == COL_SELECT:
            self.selection_changed.emit(self.selected())
        elif item.column() == COL_NAME:
            self.name_edited.emit(item.row(), item.text())
