"""Local HTTP service (`idgbr serve`) that runs pipeline jobs for the QGIS plugin, one at a time."""
