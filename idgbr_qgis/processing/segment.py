"""`idgbr:segment` — the coarse segmenter alone (no diffusion refinement)."""

from __future__ import annotations

from ..i18n import tr
from .algorithm import IdgbrAlgorithm


class SegmentAlgorithm(IdgbrAlgorithm):
    MODE = "segment"

    def output_label(self) -> str:
        return tr("Classes")

    def name(self) -> str:
        return "segment"

    def displayName(self) -> str:
        return tr("IDGBR Segment")

    def shortDescription(self) -> str:
        return tr("Classifies a raster with the bundled coarse segmenter (fast, blurrier boundaries).")

    def shortHelpString(self) -> str:
        return tr(
            "<p>Classifies each pixel with the model bundle's coarse segmenter only: faster than "
            "<i>IDGBR Refine</i>, with softer class boundaries. Its output is a valid <i>Coarse class map</i> "
            "for IDGBR Refine.</p>"
            "<p><b>Output</b>: a GeoTIFF of class ids on exactly the input's pixel grid and CRS, opened with the "
            "model's class names and colours; optionally the class polygons with <i>class_id</i> and "
            "<i>class_name</i>.</p>"
            "<p>The work runs in the IDGBR backend (a separate Python with PyTorch), on the GPU when its PyTorch "
            "can use one.</p>"
        )
