"""Map tool that draws a rectangle on the canvas: press, drag, release.

Emits the rectangle in the canvas (project) CRS; the dock sends it to the backend with that CRS's
authid, and the backend snaps it to the input raster's pixel grid.
"""

from __future__ import annotations

import contextlib
from typing import Optional

from qgis.core import QgsPointXY, QgsRectangle, QgsWkbTypes
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent

_STROKE = QColor(255, 64, 0, 230)
_FILL = QColor(255, 64, 0, 40)


class ExtentMapTool(QgsMapTool):
    """Draw an extent with a rubber band; the band stays on the map after drawing, until cleared."""

    #: the drawn rectangle, in the canvas CRS
    extentDrawn = pyqtSignal(QgsRectangle)
    #: drawing was abandoned (Esc, or a click without dragging)
    drawingCancelled = pyqtSignal()

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self._canvas = canvas
        self._start: Optional[QgsPointXY] = None
        self._extent: Optional[QgsRectangle] = None
        self._band = QgsRubberBand(canvas, QgsWkbTypes.PolygonGeometry)
        self._band.setStrokeColor(_STROKE)
        self._band.setFillColor(_FILL)
        self._band.setWidth(2)
        self.setCursor(Qt.CrossCursor)

    # -------------------------------------------------------------------------------------------- state
    def extent(self) -> Optional[QgsRectangle]:
        """The last drawn extent (canvas CRS), or None."""
        return QgsRectangle(self._extent) if self._extent is not None else None

    def setExtent(self, extent: Optional[QgsRectangle]) -> None:  # noqa: N802 (Qt naming)
        """Show a given extent (canvas CRS) as if it had been drawn; None clears it."""
        self._start = None
        if extent is None or extent.isEmpty():
            self.clear()
            return
        self._extent = QgsRectangle(extent)
        self._show(QgsPointXY(extent.xMinimum(), extent.yMinimum()), QgsPointXY(extent.xMaximum(), extent.yMaximum()))

    def clear(self) -> None:
        self._start = None
        self._extent = None
        self._band.reset(QgsWkbTypes.PolygonGeometry)

    def release(self) -> None:
        """Remove the rubber band from the canvas (plugin unload)."""
        self.clear()
        scene = self._canvas.scene()
        if scene is not None and self._band.scene() is scene:
            scene.removeItem(self._band)

    # ------------------------------------------------------------------------------------------- events
    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if event.button() != Qt.LeftButton:
            return
        self._start = event.mapPoint()
        self._show(self._start, self._start)

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self._start is not None:
            self._show(self._start, event.mapPoint())

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if self._start is None or event.button() != Qt.LeftButton:
            return
        rect = QgsRectangle(self._start, event.mapPoint())
        rect.normalize()
        self._start = None
        # A click without a drag gives a line or a point: not an extent.
        if rect.width() <= 0 or rect.height() <= 0:
            if self._extent is not None:
                self.setExtent(self._extent)
            else:
                self.clear()
            self.drawingCancelled.emit()
            return
        self._extent = rect
        self._show(QgsPointXY(rect.xMinimum(), rect.yMinimum()), QgsPointXY(rect.xMaximum(), rect.yMaximum()))
        self.extentDrawn.emit(QgsRectangle(rect))

    def activate(self) -> None:
        # While a mouse button is down the canvas hands key presses only to its keyPressed signal.
        self._canvas.keyPressed.connect(self.keyPressEvent)
        super().activate()

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if event.key() == Qt.Key_Escape and self._start is not None:
            self._start = None
            if self._extent is not None:
                self.setExtent(self._extent)
            else:
                self.clear()
            self.drawingCancelled.emit()
            event.accept()
            return
        event.ignore()

    def deactivate(self) -> None:
        # A drag interrupted by switching tools is abandoned; the finished extent stays visible.
        self._start = None
        with contextlib.suppress(TypeError):  # not connected
            self._canvas.keyPressed.disconnect(self.keyPressEvent)
        super().deactivate()

    # ----------------------------------------------------------------------------------------- drawing
    def _show(self, a: QgsPointXY, b: QgsPointXY) -> None:
        self._band.reset(QgsWkbTypes.PolygonGeometry)
        corners = [
            QgsPointXY(a.x(), a.y()),
            QgsPointXY(b.x(), a.y()),
            QgsPointXY(b.x(), b.y()),
            QgsPointXY(a.x(), b.y()),
        ]
        for i, point in enumerate(corners):
            self._band.addPoint(point, i == len(corners) - 1)
        self._band.show()
