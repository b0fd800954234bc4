"""Raster layers as files the backend can read: plain GDAL files pass through, anything else is copied.

The backend runs in another process with its own GDAL, so it can only open files on disk. Web layers
(WMS/XYZ), archives, database rasters and layers whose CRS was set inside QGIS are first written to a
temporary GeoTIFF of the requested extent, taken in each layer's own CRS. Layer properties are read in the
main thread (`describe`); the copy is made in the worker thread from a cloned data provider (`export`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsDistanceArea,
    QgsPointXY,
    QgsProviderRegistry,
    QgsRasterBlockFeedback,
    QgsRasterDataProvider,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
)

from ..i18n import tr
from .outcome import JobCancelled, JobError

if TYPE_CHECKING:
    from .spec import JobExtent

# A web layer has no pixel grid of its own: its copy is rendered at the model's pixel size, so a large
# extent means a long download. This cap keeps a mistyped extent from fetching a country.
MAX_WEB_PIXELS = 100_000_000


@dataclass
class RasterSource:
    """What the worker thread needs to know about a layer (read in the main thread)."""

    name: str
    crs: QgsCoordinateReferenceSystem
    extent: QgsRectangle
    width: int  # 0 when the layer has no native pixel grid (WMS/XYZ)
    height: int
    path: Optional[Path] = None  # a plain GDAL file the backend can open directly
    provider: Optional[QgsRasterDataProvider] = None  # a clone, to write a temporary copy

    @property
    def needs_copy(self) -> bool:
        return self.path is None


def plain_file(layer: QgsRasterLayer) -> Optional[Path]:
    """The file behind ``layer`` when another GDAL can open it as is, else None."""
    if layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path")
    # /vsi archives, sub-datasets (GeoPackage tables, NetCDF variables) and open options are QGIS-side
    # details of how the file is read: the backend would read something else.
    if not path or parts.get("vsiPrefix") or parts.get("layerName") or parts.get("openOptions"):
        return None
    file = Path(path)
    if not file.is_file():
        return None
    # A CRS assigned inside QGIS to a file without one exists only in the project.
    if layer.crs().isValid() and layer.dataProvider().crs() != layer.crs():
        return None
    return file


def describe(layer: QgsRasterLayer, parameter: str = "input") -> RasterSource:
    """Read a layer's properties in the main thread; clones its provider when a copy will be needed.
    ``parameter`` names the job field the layer is for, should it be unreadable."""
    if layer is None or not layer.isValid():
        raise JobError(tr("The raster layer could not be read; check that its file or service is reachable."),
                       parameter)
    provider = layer.dataProvider()
    sized = bool(provider.capabilities() & QgsRasterDataProvider.Size)
    source = RasterSource(
        name=layer.name(),
        crs=layer.crs(),
        extent=QgsRectangle(layer.extent()),
        width=provider.xSize() if sized else 0,
        height=provider.ySize() if sized else 0,
        path=plain_file(layer),
    )
    if source.path is None:
        source.provider = provider.clone()
    return source


def grid_window(source: RasterSource, extent: Optional[QgsRectangle]) -> tuple[QgsRectangle, int, int]:
    """The part of the layer's own pixel grid that covers ``extent`` (layer CRS): (rect, columns, rows)."""
    full = source.extent
    if extent is None:
        return QgsRectangle(full), source.width, source.height
    xres = full.width() / source.width
    yres = full.height() / source.height
    col0 = max(0, math.floor((extent.xMinimum() - full.xMinimum()) / xres + 1e-9))
    col1 = min(source.width, math.ceil((extent.xMaximum() - full.xMinimum()) / xres - 1e-9))
    row0 = max(0, math.floor((full.yMaximum() - extent.yMaximum()) / yres + 1e-9))
    row1 = min(source.height, math.ceil((full.yMaximum() - extent.yMinimum()) / yres - 1e-9))
    if col1 <= col0 or row1 <= row0:
        raise JobError(_outside_message(source, extent), "extent")
    rect = QgsRectangle(full.xMinimum() + col0 * xres, full.yMaximum() - row1 * yres,
                        full.xMinimum() + col1 * xres, full.yMaximum() - row0 * yres)
    return rect, col1 - col0, row1 - row0


def web_window(source: RasterSource, extent: Optional[QgsRectangle], pixel_size_m: float,
               context: QgsCoordinateTransformContext) -> tuple[QgsRectangle, int, int]:
    """Columns and rows that sample ``extent`` of a layer without a pixel grid at ``pixel_size_m`` on the ground."""
    if extent is None:
        raise JobError(tr("The layer '{name}' is a web or tile layer without a fixed extent of its own: set EXTENT "
                          "to the area to process (for example the current map view).").format(name=source.name),
                       "extent")
    rect = extent.intersect(source.extent) if not source.extent.isEmpty() else QgsRectangle(extent)
    if rect.isEmpty():
        raise JobError(_outside_message(source, extent), "extent")
    # Ground distances through the ellipsoid, so that degrees and Web Mercator's stretched metres both work.
    measure = QgsDistanceArea()
    measure.setSourceCrs(source.crs, context)
    measure.setEllipsoid("WGS84")
    mid_y = rect.center().y()
    mid_x = rect.center().x()
    width_m = measure.measureLine(QgsPointXY(rect.xMinimum(), mid_y), QgsPointXY(rect.xMaximum(), mid_y))
    height_m = measure.measureLine(QgsPointXY(mid_x, rect.yMinimum()), QgsPointXY(mid_x, rect.yMaximum()))
    columns = max(1, round(width_m / pixel_size_m))
    rows = max(1, round(height_m / pixel_size_m))
    if columns * rows > MAX_WEB_PIXELS:
        raise JobError(tr("The extent is {width:.1f} × {height:.1f} km: {columns} × {rows} pixels at {pixel} m from "
                          "the web layer '{name}', more than the {limit} megapixels IDGBR downloads at once. Choose "
                          "a smaller EXTENT.").format(width=width_m / 1000, height=height_m / 1000, columns=columns,
                                                      rows=rows, pixel=pixel_size_m, name=source.name,
                                                      limit=MAX_WEB_PIXELS // 1_000_000), "extent")
    return rect, columns, rows


def export(source: RasterSource, target: Path, extent: Optional[QgsRectangle], pixel_size_m: float,
           context: QgsCoordinateTransformContext, is_cancelled: Optional[Callable[[], bool]] = None) -> Path:
    """Write ``extent`` (in the layer's CRS; None: all of it) of the layer to the GeoTIFF ``target``.

    Layers with a pixel grid are copied pixel for pixel (values kept); web layers are rendered to RGBA at
    ``pixel_size_m``. Returns ``target``; raises JobError when writing fails, JobCancelled when cancelled.
    """
    if source.provider is None:
        raise JobError(f"Internal error: no data provider to copy '{source.name}' from.")
    if source.width > 0:
        rect, columns, rows = grid_window(source, extent)
    else:
        rect, columns, rows = web_window(source, extent, pixel_size_m, context)
    pipe = QgsRasterPipe()
    if not pipe.set(source.provider.clone()):
        raise JobError(tr("Could not read the layer '{name}' for copying.").format(name=source.name))
    writer = QgsRasterFileWriter(str(target))
    writer.setOutputFormat("GTiff")
    writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES", "BIGTIFF=IF_SAFER"])
    block_feedback = QgsRasterBlockFeedback()
    if is_cancelled is not None:
        # The writer reports progress from this (worker) thread: check for cancel there.
        block_feedback.progressChanged.connect(lambda _p: block_feedback.cancel() if is_cancelled() else None)
    error = writer.writeRaster(pipe, columns, rows, rect, source.crs, context, block_feedback)
    if error == QgsRasterFileWriter.WriteCanceled:
        remove_raster(target)
        raise JobCancelled(tr("Cancelled while copying the input layer; nothing was written."))
    if error != QgsRasterFileWriter.NoError:
        remove_raster(target)
        raise JobError(tr("Could not copy the layer '{name}' to a temporary GeoTIFF (error {error}): check free disk "
                          "space in the temporary folder.").format(name=source.name, error=int(error)))
    return target


def readable(source: RasterSource, target: Path, extent: Optional[JobExtent], pixel_size_m: float,
             context: QgsCoordinateTransformContext, is_cancelled: Optional[Callable[[], bool]] = None,
             margin: float = 0.0) -> Path:
    """The file the backend reads for ``source``: the layer's own, or a GeoTIFF copy at ``target`` of
    ``extent`` taken in the layer's own CRS and grown by ``margin`` times its size on each side."""
    if not source.needs_copy:
        assert source.path is not None
        return source.path
    window = extent.in_crs(source.crs, context, margin) if extent is not None else None
    return export(source, target, window, pixel_size_m, context, is_cancelled)


def _outside_message(source: RasterSource, extent: QgsRectangle) -> str:
    return tr("The extent {extent} does not overlap the layer '{name}' ({own} in {crs}). Choose an extent inside the "
              "layer, or leave EXTENT empty to process all of it.").format(
        extent=extent.toString(3), name=source.name, own=source.extent.toString(3),
        crs=source.crs.authid() or tr("its CRS"))


def remove_raster(path: Path) -> None:
    """Remove a GeoTIFF this job wrote and its .aux.xml side file, if there."""
    for file in (path, path.with_name(path.name + ".aux.xml")):
        with contextlib.suppress(OSError):
            file.unlink()
