"""Streaming raster engine: tiling and blending (windows), GeoTIFF I/O (io), band mapping (bands), the
tile scheduler (engine)."""
