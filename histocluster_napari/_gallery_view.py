"""The gallery of the HistoCluster widget: a scrolling grid of one cluster's tiles across slides.

Thumbnails arrive from a worker (``_gallery.read_gallery``) page by page; scrolling to the end
asks for the next page; clicking a tile emits ``tile_clicked(slide_id, row, col)``; a number key
1-9 over the current tile emits ``number_pressed(slide_id, row, col, n)`` (review answers).
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QSize, Qt, Signal
from qtpy.QtGui import QIcon
from qtpy.QtWidgets import QListView, QListWidget, QListWidgetItem

from histocluster_napari._cluster_table import rgb_pixmap
from histocluster_napari._gallery import THUMB_PX, GalleryTile

ROLE = Qt.ItemDataRole.UserRole


class GalleryView(QListWidget):
    """Icon grid of ``GalleryTile``s, each captioned with its slide; emits ``more_wanted`` at the end."""

    ROLE = ROLE
    tile_clicked = Signal(str, int, int)
    more_wanted = Signal()
    number_pressed = Signal(str, int, int, int)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setViewMode(QListView.ViewMode.IconMode)
        self.setResizeMode(QListView.ResizeMode.Adjust)
        self.setMovement(QListView.Movement.Static)
        self.setIconSize(QSize(THUMB_PX, THUMB_PX))
        self.setGridSize(QSize(THUMB_PX + 12, THUMB_PX + 30))
        self.setWordWrap(True)
        self.setUniformItemSizes(True)
        self.setMinimumHeight(THUMB_PX + 30 + 12)
        self.itemClicked.connect(self._on_click)
        self.verticalScrollBar().valueChanged.connect(self._on_scroll)
        self.cluster: int | None = None

    def clear_tiles(self, cluster: int | None) -> None:
        self.clear()
        self.cluster = cluster

    def add_tile(self, tile: GalleryTile, rgb: np.ndarray) -> None:
        item = QListWidgetItem(QIcon(rgb_pixmap(rgb)), tile.slide_id)
        item.setData(ROLE, (tile.slide_id, tile.row, tile.col))
        kind = "near the centre" if tile.nearest else "random sample"
        about = tile.note or f"{kind}, distance {tile.distance:.3f}"
        item.setToolTip(f"{tile.slide_id}, tile ({tile.row}, {tile.col}), {about}")
        self.addItem(item)

    def mark(self, sid: str, row: int, col: int, text: str) -> None:
        """Caption the tile (sid, row, col) with ``text`` (e.g. the class a review gave it)."""
        for i in range(self.count()):
            if tuple(self.item(i).data(ROLE)) == (sid, row, col):
                self.item(i).setText(f"{sid}: {text}")

    def press_number(self, n: int) -> None:
        """Press number key ``n`` over the current tile (what the keyboard does)."""
        item = self.currentItem()
        if item is not None:
            sid, row, col = item.data(ROLE)
            self.number_pressed.emit(sid, int(row), int(col), int(n))

    def keyPressEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        text = event.text()
        if len(text) == 1 and text in "123456789":
            self.press_number(int(text))
            return
        super().keyPressEvent(event)

    def tiles(self) -> list[tuple[str, int, int]]:
        return [self.item(i).data(ROLE) for i in range(self.count())]

    def click(self, index: int) -> None:
        """Click the ``index``-th tile (what a mouse click does)."""
        self._on_click(self.item(index))

    def _on_click(self, item: QListWidgetItem) -> None:
        self.setCurrentItem(item)
        sid, row, col = item.data(ROLE)
        self.tile_clicked.emit(sid, int(row), int(col))

    def _on_scroll(self, value: int) -> None:
        if value >= self.verticalScrollBar().maximum():
            self.more_wanted.emit()
