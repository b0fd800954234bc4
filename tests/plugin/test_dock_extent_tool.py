"""The extent map tool, driven by real mouse events on the map canvas."""

from __future__ import annotations

import pytest
from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest

from idgbr_qgis.ui.extent_tool import ExtentMapTool


@pytest.fixture
def canvas(qgis_canvas):
    qgis_canvas.resize(400, 300)
    qgis_canvas.show()
    qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem("EPSG:32640"))
    qgis_canvas.setExtent(QgsRectangle(300000, 2780000, 300400, 2780300))
    qgis_canvas.refresh()
    QTest.qWait(10)
    yield qgis_canvas
    qgis_canvas.unsetMapTool(qgis_canvas.mapTool())


def _drag(canvas, start: QPoint, end: QPoint) -> None:
    viewport = canvas.viewport()
    QTest.mousePress(viewport, Qt.LeftButton, Qt.NoModifier, start)
    QTest.mouseMove(viewport, QPoint((start.x() + end.x()) // 2, (start.y() + end.y()) // 2))
    QTest.mouseMove(viewport, end)
    QTest.mouseRelease(viewport, Qt.LeftButton, Qt.NoModifier, end)


def test_drag_emits_extent_in_canvas_crs(canvas):
    tool = ExtentMapTool(canvas)
    canvas.setMapTool(tool)
    drawn: list[QgsRectangle] = []
    tool.extentDrawn.connect(drawn.append)
    # Drag from lower right to upper left: the extent still comes out normalised.
    _drag(canvas, QPoint(300, 250), QPoint(100, 50))
    assert len(drawn) == 1
    rect = drawn[0]
    to_map = canvas.getCoordinateTransform()
    a = to_map.toMapCoordinates(100, 50)
    b = to_map.toMapCoordinates(300, 250)
    assert rect.xMinimum() == pytest.approx(min(a.x(), b.x()))
    assert rect.xMaximum() == pytest.approx(max(a.x(), b.x()))
    assert rect.yMinimum() == pytest.approx(min(a.y(), b.y()))
    assert rect.yMaximum() == pytest.approx(max(a.y(), b.y()))
    assert rect.width() > 0 and rect.height() > 0
    assert tool.extent() == rect
    tool.release()


def test_click_without_drag_is_not_an_extent(canvas):
    tool = ExtentMapTool(canvas)
    canvas.setMapTool(tool)
    drawn: list[QgsRectangle] = []
    cancelled: list[bool] = []
    tool.extentDrawn.connect(drawn.append)
    tool.drawingCancelled.connect(lambda: cancelled.append(True))
    QTest.mouseClick(canvas.viewport(), Qt.LeftButton, Qt.NoModifier, QPoint(150, 150))
    assert drawn == [] and cancelled == [True]
    assert tool.extent() is None
    tool.release()


def test_escape_abandons_a_drag_and_keeps_the_previous_extent(canvas):
    tool = ExtentMapTool(canvas)
    canvas.setMapTool(tool)
    _drag(canvas, QPoint(50, 50), QPoint(150, 150))
    first = tool.extent()
    assert first is not None
    viewport = canvas.viewport()
    QTest.mousePress(viewport, Qt.LeftButton, Qt.NoModifier, QPoint(200, 200))
    QTest.mouseMove(viewport, QPoint(260, 260))
    QTest.keyClick(canvas, Qt.Key_Escape)
    QTest.mouseRelease(viewport, Qt.LeftButton, Qt.NoModifier, QPoint(260, 260))
    assert tool.extent() == first
    tool.release()
