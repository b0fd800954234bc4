"""Style the algorithms' outputs when QGIS loads them: paletted raster, categorized polygons, and the
confidence ramp."""

from __future__ import annotations

from collections import deque
from typing import Any, Deque, Dict, List

from qgis.core import (
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterLayer,
    QgsVectorLayer,
)

from ..i18n import tr
from ..styling import apply_class_style, apply_confidence_style, categorized_renderer

# QGIS keeps only a raw pointer to a post-processor: Python must hold the object until QGIS has called it
# (after the algorithm, in the main thread). The last runs' processors are kept; they are small.
_ALIVE: Deque[QgsProcessingLayerPostProcessorInterface] = deque(maxlen=1000)


class ClassStyle(QgsProcessingLayerPostProcessorInterface):
    """Applies the model card's class names and colours to an output layer."""

    def __init__(self, classes: List[Dict[str, Any]]) -> None:
        super().__init__()
        self.classes = classes

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> None:
        try:
            if isinstance(layer, QgsRasterLayer):
                apply_class_style(layer, self.classes)
            elif isinstance(layer, QgsVectorLayer):
                layer.setRenderer(categorized_renderer(self.classes))
                layer.triggerRepaint()
        except ValueError as exc:  # a broken class table: keep QGIS's default style, say why
            feedback.reportError(tr("Could not style {name} with the model's classes: {reason}").format(
                name=layer.name(), reason=exc))


def style_on_load(context: QgsProcessingContext, output: str, classes: List[Dict[str, Any]]) -> bool:
    """Attach a ClassStyle to ``output`` when QGIS will load it; returns whether it will be styled."""
    if not output or not classes or not context.willLoadLayerOnCompletion(output):
        return False
    processor = ClassStyle(classes)
    _ALIVE.append(processor)
    context.layerToLoadOnCompletionDetails(output).setPostProcessor(processor)
    return True


class ConfidenceStyle(QgsProcessingLayerPostProcessorInterface):
    """Applies the confidence ramp (red = unsure, clear = sure) to the confidence output layer."""

    def postProcessLayer(self, layer: QgsMapLayer, context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> None:
        if isinstance(layer, QgsRasterLayer):
            apply_confidence_style(layer)


def style_confidence_on_load(context: QgsProcessingContext, output: str) -> bool:
    """Attach a ConfidenceStyle to ``output`` when QGIS will load it; returns whether it will be styled."""
    if not output or not context.willLoadLayerOnCompletion(output):
        return False
    processor = ConfidenceStyle()
    _ALIVE.append(processor)
    context.layerToLoadOnCompletionDetails(output).setPostProcessor(processor)
    return True
