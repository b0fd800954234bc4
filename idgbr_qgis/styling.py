"""Styles of the outputs: paletted class-id rasters from a model card's class table (names and colours),
categorized class polygons, and the refiner's confidence as a red-to-clear ramp."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsPalettedRasterRenderer,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
)
from qgis.PyQt.QtGui import QColor


def class_data(classes: Iterable[Mapping[str, Any]]) -> list[QgsPalettedRasterRenderer.Class]:
    """Turn model-card classes ``[{"id", "name", "color": "#RRGGBB"}]`` into renderer classes, sorted by id.

    Raises ValueError naming the bad entry: a card with a broken class table must not give a silently
    wrong legend.
    """
    result = []
    seen: set[int] = set()
    for entry in classes:
        try:
            value = int(entry["id"])
            name = str(entry["name"])
            color = QColor(str(entry["color"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"class entry {entry!r} needs an integer 'id', a 'name' and a 'color'") from exc
        if not color.isValid():
            raise ValueError(f"class {name!r} has an invalid colour {entry['color']!r}; use '#RRGGBB'")
        if value in seen:
            raise ValueError(f"class id {value} appears twice in the class table")
        seen.add(value)
        result.append(QgsPalettedRasterRenderer.Class(value, color, name))
    if not result:
        raise ValueError("the class table is empty")
    return sorted(result, key=lambda c: c.value)


def paletted_renderer(layer: QgsRasterLayer, classes: Iterable[Mapping[str, Any]],
                      band: int = 1) -> QgsPalettedRasterRenderer:
    """A paletted renderer for ``band`` of ``layer``: one legend entry per class, named from the card."""
    return QgsPalettedRasterRenderer(layer.dataProvider(), band, class_data(classes))


def apply_class_style(layer: QgsRasterLayer, classes: Iterable[Mapping[str, Any]], band: int = 1) -> None:
    """Style ``layer`` with the class table; pixels outside the table (nodata) stay transparent."""
    layer.setRenderer(paletted_renderer(layer, classes, band))
    layer.triggerRepaint()
    # The legend (layer tree) rebuilds its nodes on this signal.
    layer.emitStyleChanged()


def classes_from_color_table(layer: QgsRasterLayer, band: int = 1) -> list[dict]:
    """Class table from the raster's own colour table (names are the ids), for outputs without a card."""
    entries = QgsPalettedRasterRenderer.colorTableToClassData(layer.dataProvider().colorTable(band))
    return [{"id": int(c.value), "name": c.label or str(int(c.value)), "color": c.color.name()} for c in entries]


def class_names(classes: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """``{id: name}`` of a model card's class table."""
    return {int(c["id"]): str(c["name"]) for c in classes}


def categorized_renderer(classes: Iterable[Mapping[str, Any]], field: str = "class_id",
                         opacity: float = 0.6) -> QgsCategorizedSymbolRenderer:
    """Fill polygons by ``field`` (class id) with the class colours, semi-transparent over the image."""
    categories = []
    for entry in class_data(classes):
        symbol = QgsFillSymbol.createSimple({"color": entry.color.name(),
                                             "outline_color": entry.color.darker(150).name(), "outline_width": "0.2"})
        symbol.setOpacity(opacity)
        categories.append(QgsRendererCategory(entry.value, symbol, entry.label))
    return QgsCategorizedSymbolRenderer(field, categories)


# The refiner's confidence, 0..1: unsure pixels stand out in red over the class map, sure ones are clear.
CONFIDENCE_RAMP = (
    (0.0, "#d7191c", 230, "0 — unsure"),
    (0.5, "#fdae61", 170, "0.5"),
    (0.8, "#ffffbf", 60, "0.8"),
    (1.0, "#ffffff", 0, "1 — sure"),
)


def confidence_renderer(layer: QgsRasterLayer, band: int = 1) -> QgsSingleBandPseudoColorRenderer:
    """A pseudocolour renderer of ``band`` over 0..1: red (unsure) through orange and pale yellow to
    transparent white (sure). Nodata (-1) stays transparent."""
    ramp = QgsColorRampShader(0.0, 1.0)
    ramp.setColorRampType(QgsColorRampShader.Interpolated)
    items = []
    for value, name, alpha, label in CONFIDENCE_RAMP:
        color = QColor(name)
        color.setAlpha(alpha)
        items.append(QgsColorRampShader.ColorRampItem(value, color, label))
    ramp.setColorRampItemList(items)
    ramp.setClip(True)  # values outside 0..1 (there are none but nodata) are not drawn
    shader = QgsRasterShader(0.0, 1.0)
    shader.setRasterShaderFunction(ramp)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), band, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    return renderer


def apply_confidence_style(layer: QgsRasterLayer, band: int = 1) -> None:
    """Style ``layer`` (the refiner's confidence output) with ``confidence_renderer``."""
    layer.setRenderer(confidence_renderer(layer, band))
    layer.triggerRepaint()
    layer.emitStyleChanged()


# Where the refiner changed the coarse map: a strong colour over the class map; unchanged pixels are clear.
CHANGED_COLOR = "#ff00ff"


def apply_changes_style(layer: QgsRasterLayer, label: str = "changed", band: int = 1) -> None:
    """Style ``layer`` (1 = changed, 0 = unchanged) so that only the changed pixels show, in CHANGED_COLOR."""
    changed = QgsPalettedRasterRenderer.Class(1, QColor(CHANGED_COLOR), label)
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), band, [changed]))
    layer.triggerRepaint()
    layer.emitStyleChanged()
