"""`idgbr:refine` — sharpen the class boundaries of a coarse class map with the diffusion refiner."""

from __future__ import annotations

from ..i18n import tr
from .algorithm import IdgbrAlgorithm


class RefineAlgorithm(IdgbrAlgorithm):
    MODE = "refine"

    def name(self) -> str:
        return "refine"

    def displayName(self) -> str:
        return tr("IDGBR Refine")

    def shortDescription(self) -> str:
        return tr("Classifies a raster and sharpens the class boundaries with a diffusion refiner.")

    def shortHelpString(self) -> str:
        return tr(
            "<p>Turns a coarse class map into one with accurate boundaries. The coarse map comes from the "
            "bundled segmenter, or from <b>any</b> other model or classification (<i>Coarse class map</i>). A "
            "guidance network reads the image and the coarse map; a small diffusion model redraws the map near "
            "the class boundaries in a few denoising steps.</p>"
            "<p><b>Output</b>: a GeoTIFF of class ids on exactly the input's pixel grid and CRS, opened with the "
            "model's class names and colours; optionally the class polygons with <i>class_id</i> and "
            "<i>class_name</i>.</p>"
            "<p><b>Never-harm rules</b> (advanced parameters, empty = the model's defaults): the refiner changes "
            "a pixel only within the <i>change band</i> of a coarse boundary, only to a class the coarse map has "
            "nearby (<i>vocabulary</i>), and only where it is at least <i>minimum confidence</i> sure. The "
            "optional <i>Refiner confidence</i> output shows where it was unsure (red).</p>"
            "<p><b>Tips</b>: set an <i>Extent</i> (in any CRS) to try a small area first. Fewer <i>diffusion "
            "steps</i> are faster. Web and virtual layers are copied to a temporary GeoTIFF first. The work runs "
            "in the IDGBR backend (a separate Python with PyTorch, set up from Plugins ▸ IDGBR ▸ Settings…), "
            "on the GPU when its PyTorch can use one.</p>"
        )
