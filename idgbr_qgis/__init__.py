"""IDGBR for QGIS: segment rasters and refine class boundaries with a diffusion model.

QGIS imports this package at start-up: keep it free of heavy imports (no torch, numpy or rasterio).
"""


def classFactory(iface):  # noqa: N802 - the name QGIS looks for
    """QGIS entry point; ``iface`` is None in qgis_process."""
    from .plugin import IdgbrPlugin

    return IdgbrPlugin(iface)
