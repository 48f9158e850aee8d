"""The gallery of the HistoCluster widget: a scrolling grid of one cluster's tiles across slides.

Thumbnails arrive from a worker (``_gallery.read_gallery``) page by page; scrolling to the end
asks for the next page; clicking a tile emits ``tile_clicked(slide_id, row, col)``.
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

    tile_clicked = Signal(str, int, int)
    more_wanted = Signal()

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
        item.setToolTip(
            f"{tile.slide_id}, tile ({tile.row}, {tile.col}), {kind}, distance {tile.distance:.3f}"
        )
        self.addItem(item)

    def tiles(self) -> list[tuple[str, int, int]]:
        return [self.item(i).data(ROLE) for i in range(self.count())]

    def click(self, index: int) -> None:
        """Click the ``index``-th tile (what a mouse click does)."""
        self._on_click(self.item(index))

    def _on_click(self, item: QListWidgetItem) -> None:
        sid, row, col = item.data(ROLE)
        self.tile_clicked.emit(sid, int(row), int(col))

    def _on_scroll(self, value: int) -> None:
        if value >= self.verticalScrollBar().maximum():
            self.more_wanted.emit()
