"""The "IDGBR" Processing provider (id `idgbr`)."""

from __future__ import annotations

from typing import List

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from ..i18n import tr
from .algorithm import ICON
from .refine import RefineAlgorithm
from .segment import SegmentAlgorithm


class IdgbrProvider(QgsProcessingProvider):
    def id(self) -> str:
        return "idgbr"

    def name(self) -> str:
        return "IDGBR"

    def longName(self) -> str:
        return tr("IDGBR — diffusion boundary refinement")

    def icon(self) -> QIcon:
        return QIcon(str(ICON))

    def svgIconPath(self) -> str:
        return str(ICON)

    def loadAlgorithms(self) -> None:
        self.addAlgorithm(RefineAlgorithm())
        self.addAlgorithm(SegmentAlgorithm())

    def supportedOutputRasterLayerExtensions(self) -> List[str]:
        # The backend writes GeoTIFF only: the output widgets then offer .tif alone.
        return ["tif"]
