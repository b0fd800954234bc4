"""The changed pixels of a refinement: 1 where the refined map differs from the coarse map it started from.

Computed in QGIS from the two class maps (QgsRasterCalculator), on the refined map's grid: a coarse map on
another grid or in another CRS is read there (nearest), so class ids are compared, never blended. Pixels
that are nodata in either map are nodata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from qgis.analysis import QgsRasterCalculator, QgsRasterCalculatorEntry
from qgis.core import QgsCoordinateTransformContext, QgsFeedback, QgsRasterLayer

from ..i18n import tr
from .inputs import remove_raster
from .outcome import JobCancelled, JobError

CHANGED = 1  # the value of a changed pixel; unchanged ones hold 0


def write_changes(refined: Path, coarse: Path, target: Path, context: QgsCoordinateTransformContext,
                  is_cancelled: Optional[Callable[[], bool]] = None) -> Path:
    """Write the changed pixels of ``refined`` against ``coarse`` to the GeoTIFF ``target``; returns it."""
    # Layers of this thread only: they are never added to a project.
    layers = {"refined": QgsRasterLayer(str(refined), "refined", "gdal"),
              "coarse": QgsRasterLayer(str(coarse), "coarse", "gdal")}
    for name, layer in layers.items():
        if not layer.isValid():
            raise JobError(tr("Cannot read the {what} map {path} to mark the changed pixels.").format(
                what=name, path=layer.source()))
    entries = []
    for name, layer in layers.items():
        entry = QgsRasterCalculatorEntry()
        entry.ref = f"{name}@1"
        entry.raster = layer
        entry.bandNumber = 1
        entries.append(entry)
    grid = layers["refined"]
    calculator = QgsRasterCalculator('"refined@1" != "coarse@1"', str(target), "GTiff", grid.extent(), grid.crs(),
                                     grid.width(), grid.height(), entries, context)
    feedback = QgsFeedback()
    if is_cancelled is not None:
        feedback.progressChanged.connect(lambda _p: feedback.cancel() if is_cancelled() else None)
    result = calculator.processCalculation(feedback)
    if result == QgsRasterCalculator.Canceled:
        remove_raster(target)
        raise JobCancelled(tr("Cancelled while marking the changed pixels."))
    if result != QgsRasterCalculator.Success:
        remove_raster(target)
        raise JobError(tr("Could not write the changed pixels to {path} (error {error}): check free disk space and "
                          "the results folder.").format(path=target, error=int(result)))
    return target

