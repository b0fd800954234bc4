"""Class polygons from a class-id raster: QGIS's own GDAL polygonize, then a class name per polygon."""

from __future__ import annotations

from typing import Any, Dict, List

from qgis.core import (
    QgsFeature,
    QgsFeatureSink,
    QgsField,
    QgsFields,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingUtils,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QVariant

from ..i18n import tr
from ..styling import class_names

CLASS_ID_FIELD = "class_id"
CLASS_NAME_FIELD = "class_name"


def polygon_fields() -> QgsFields:
    fields = QgsFields()
    fields.append(QgsField(CLASS_ID_FIELD, QVariant.Int))
    fields.append(QgsField(CLASS_NAME_FIELD, QVariant.String, len=100))
    return fields


def polygonize_classes(algorithm: QgsProcessingAlgorithm, parameters: Dict[str, Any], sink_name: str,
                       raster: str, classes: List[Dict[str, Any]], context: QgsProcessingContext,
                       feedback: QgsProcessingFeedback) -> str:
    """Write the polygons of ``raster``'s classes to the sink parameter ``sink_name``; returns its id."""
    import processing  # QGIS's Processing plugin: present wherever Processing algorithms run

    # The algorithm's own feedback, not a QgsProcessingMultiStepFeedback: GDAL reports progress from its
    # process-reading thread, and a queued report to a short-lived proxy feedback can outlive its parent.
    temporary = QgsProcessingUtils.generateTempFilename("idgbr_polygons.gpkg")
    result = processing.run(
        "gdal:polygonize",
        {"INPUT": raster, "BAND": 1, "FIELD": CLASS_ID_FIELD, "EIGHT_CONNECTEDNESS": False, "EXTRA": "",
         "OUTPUT": temporary},
        context=context, feedback=feedback, is_child_algorithm=True,
    )
    layer = QgsVectorLayer(result["OUTPUT"], "polygons", "ogr")
    if not layer.isValid():
        raise QgsProcessingException(tr("GDAL polygonize did not produce a readable layer from {path}.").format(
            path=raster))
    fields = polygon_fields()
    sink, dest_id = algorithm.parameterAsSink(parameters, sink_name, context, fields, QgsWkbTypes.Polygon,
                                              layer.crs())
    if sink is None:
        raise QgsProcessingException(algorithm.invalidSinkError(parameters, sink_name))
    names = class_names(classes)
    source_index = layer.fields().indexOf(CLASS_ID_FIELD)
    for feature in layer.getFeatures():
        if feedback.isCanceled():
            raise QgsProcessingException(tr("Cancelled while writing the class polygons."))
        class_id = int(feature.attribute(source_index))
        polygon = QgsFeature(fields)
        polygon.setGeometry(feature.geometry())
        # Ids outside the class table (none for IDGBR outputs) keep an empty name rather than a wrong one.
        polygon.setAttributes([class_id, names.get(class_id)])
        if not sink.addFeature(polygon, QgsFeatureSink.FastInsert):
            raise QgsProcessingException(algorithm.writeFeatureError(sink, parameters, sink_name))
    return dest_id
