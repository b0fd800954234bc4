"""What a job may ask for, in one place: devices, precisions, the default model and the ranges of the numeric
options. The command line, the service, the pipeline and the model card's checks read them here.

The QGIS plugin never imports the backend, so it keeps a copy in ``idgbr_qgis/limits.py``;
``tests/plugin/test_limits.py`` fails when the two disagree.
"""

from __future__ import annotations

MODES = ("refine", "segment")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_MODEL = "dubai5"  # the bundled model a job gets when it names none

MIN_STEPS, MAX_STEPS = 1, 100  # denoising steps of the refiner
MIN_TILE, MAX_TILE = 16, 4096  # tile edge in pixels; the overlap is at most half of it
MAX_RULE_PX = 1024  # largest band / vocabulary radius; -1 switches a rule off
MAX_SEED = 2**31 - 1
MAX_PIXEL_SIZE_M = 10.0  # coarser rasters are refused: no bundled model sees buildings or roads there
