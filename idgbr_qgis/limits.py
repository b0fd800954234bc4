"""What a job may ask for, as the backend allows it (``backend/idgbr/limits.py``): the plugin never imports the
backend, so it keeps this copy, and ``tests/plugin/test_limits.py`` fails when the two disagree. The toolbox, the dock
and the settings dialog offer exactly these choices and ranges."""

MODES = ("refine", "segment")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEFAULT_MODEL = "dubai5"

MIN_STEPS, MAX_STEPS = 1, 100
MIN_TILE, MAX_TILE = 16, 4096
MAX_RULE_PX = 1024
MAX_SEED = 2**31 - 1
MAX_PIXEL_SIZE_M = 10.0
