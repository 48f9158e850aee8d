"""A scroll area that scrolls its sections vertically only, as wide as the widest needs.

The dock's sections stacked need ~1,250 px, more than a laptop's screen: unscrolled, the dock's
minimum height made napari's window taller than the screen (its canvas ~100 px wide). Scrolled
both ways, a section narrower than it needs would be cut on the right; so the area asks for
the width its sections need (and the scroll bar's), and for little height.
"""

from __future__ import annotations

from qtpy.QtCore import QEvent, QObject, QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget


class VerticalScroll(QScrollArea):
    """Holds ``body`` (a QWidget with a vertical layout, the sections go in it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = QWidget()
        QVBoxLayout(self.body).setContentsMargins(0, 0, 0, 0)
        self.setWidgetResizable(True)  # the body takes the area's width, and at least its height
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setWidget(self.body)
        self.body.installEventFilter(self)

    def _width(self, body_width: int) -> int:
        return body_width + self.verticalScrollBar().sizeHint().width() + 2 * self.frameWidth()

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(
            self._width(self.body.minimumSizeHint().width()), super().minimumSizeHint().height()
        )

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt's name)
        return QSize(self._width(self.body.sizeHint().width()), super().sizeHint().height())

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt's name)
        """A section added to the body (its layout asks again): the dock asks this area again."""
        if watched is self.body and event.type() == QEvent.Type.LayoutRequest:
            self.updateGeometry()
        return super().eventFilter(watched, event)
