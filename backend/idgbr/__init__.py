"""IDGBR: coarse segmentation plus diffusion-based boundary refinement for remote-sensing rasters."""

__version__ = "0.1.0"
