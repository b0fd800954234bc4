"""Ground resolution: the model card's valid range, the input's pixel size in metres, and the plan of a run
(at which resolution the coarse segmenter and the refiner work; the output is always on the input's grid).

A model sees objects at the scale it was trained at. A 5 cm drone tile shown to a model trained at 0.5 m
looks like a few giant roofs, a 2 m satellite scene like a texture: outside its range the model's output is
noise. So the run resamples its inputs to a resolution the model knows, and brings the results back to the
input's grid pixel for pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rasterio.crs import CRS
from rasterio.errors import CRSError

from .card import ModelCard
from .errors import IdgbrError
from .limits import MAX_PIXEL_SIZE_M

RANGE_FACTOR = 2.0  # a card without pixel_size_range_m is valid from working / 2 to working * 2
DEFAULT_WORKING_M = 0.5  # cards without pixel_size_m (none of ours): assume the bundled models' value
METRES_PER_DEGREE_LAT = 110_574.0  # WGS84, mid latitudes: close enough for choosing a resolution
METRES_PER_DEGREE_LON_EQUATOR = 111_320.0
SAME = 1e-6  # relative difference below which two pixel sizes are one


def working_pixel_size(card: ModelCard) -> float:
    """The model card's working resolution in metres per pixel (``pixel_size_m``)."""
    return float(card.pixel_size_m) if card.pixel_size_m else DEFAULT_WORKING_M


def pixel_size_range(card: ModelCard) -> tuple[float, float]:
    """[min, max] metres per pixel the model is valid at: the card's ``pixel_size_range_m``, else the working
    value / 2 to * 2 (the one place that default is written)."""
    given = card.pixel_size_range_m
    if given:
        return float(given[0]), float(given[1])
    working = working_pixel_size(card)
    return working / RANGE_FACTOR, working * RANGE_FACTOR


def metres(value: float) -> str:
    """0.05 -> '0.05', 0.3 -> '0.3', 1.0 -> '1', 12.3456 -> '12.3' (two significant digits below 10)."""
    return f"{value:.3g}" if value < 10 else f"{value:.1f}".rstrip("0").rstrip(".")


def range_text(card: ModelCard) -> str:
    """'works from 0.25 to 1 m per pixel (working resolution 0.5 m)'."""
    low, high = pixel_size_range(card)
    return (f"works from {metres(low)} to {metres(high)} m per pixel (working resolution "
            f"{metres(working_pixel_size(card))} m)")


def check_pixel_size_option(value: float | None) -> None:
    """The --pixel-size option: None (detect) or a positive finite number of metres."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise IdgbrError(f"The pixel size must be a positive number of metres (got {value!r}); fix --pixel-size, "
                         "or leave it out to use the raster's own.")


def _linear_factor(crs: CRS) -> float:
    try:
        factor = crs.linear_units_factor[1]
    except (CRSError, TypeError, IndexError):
        return 1.0  # unknown unit: metres is the common case
    return float(factor) if factor and math.isfinite(factor) and factor > 0 else 1.0


def detect_pixel_size(src, window, card: ModelCard) -> tuple[float, str | None]:
    """Metres per pixel of INPUT over ``window`` and a note for the run when it is assumed (no CRS).

    Projected CRS: the transform's pixel size in the CRS's linear unit. Geographic: the size in degrees at the
    latitude of the window's centre. No CRS: the model's working value (the caller says so). Non-square pixels
    count with the mean of their two sides."""
    t = src.transform
    size_x, size_y = math.hypot(t.a, t.d), math.hypot(t.b, t.e)
    if src.crs is None:
        working = working_pixel_size(card)
        return working, (f"INPUT has no CRS, so its pixel size is unknown: taken as {metres(working)} m, the model's "
                         "working resolution. Give --pixel-size METRES if it is not.")
    if src.crs.is_geographic:
        top = t.f + window.row_off * t.e
        bottom = t.f + (window.row_off + window.height) * t.e
        lat = (top + bottom) / 2
        if not all(math.isfinite(v) and abs(v) <= 90.0 + 1e-9 for v in (top, bottom)):
            raise IdgbrError(f"INPUT is in {src.crs.to_string()} (degrees) but its latitudes run from {bottom:g} to "
                             f"{top:g}, outside -90..90: its georeference is wrong, so its pixel size in metres "
                             "is unknown. Fix the raster's georeference (e.g. gdal_edit.py -a_srs / -a_ullr), or "
                             "give --pixel-size METRES.")
        size_x *= METRES_PER_DEGREE_LON_EQUATOR * math.cos(math.radians(lat))
        size_y *= METRES_PER_DEGREE_LAT
    else:
        factor = _linear_factor(src.crs)
        size_x, size_y = size_x * factor, size_y * factor
    size = (size_x + size_y) / 2
    if not math.isfinite(size) or size <= 0:
        raise IdgbrError(f"INPUT's pixel size is {size!r} m according to its georeference, which is not a size; "
                         "fix the raster's georeference or give --pixel-size METRES.")
    return size, None


@dataclass
class ResolutionPlan:
    """Metres per pixel of the input and of each pass; ``input_m`` is also the output's."""

    input_m: float
    coarse_m: float
    refine_m: float
    low_m: float
    high_m: float
    working_m: float
    notes: list[str] = field(default_factory=list)

    @property
    def coarse_resampled(self) -> bool:
        return not same_size(self.coarse_m, self.input_m)

    @property
    def refine_resampled(self) -> bool:
        return not same_size(self.refine_m, self.input_m)

    def summary(self, mode: str, segmented: bool = True) -> str:
        """'INPUT is 0.05 m per pixel; segmented at 0.3 m, refined at 0.15 m, written at 0.05 m' (refine
        with --coarse: no coarse pass, so no 'segmented at')."""
        done = [f"segmented at {metres(self.coarse_m)} m"] if segmented or mode != "refine" else []
        if mode == "refine":
            done.append(f"refined at {metres(self.refine_m)} m")
        return (f"INPUT is {metres(self.input_m)} m per pixel; {', '.join(done)}, written at "
                f"{metres(self.input_m)} m")


def same_size(a: float, b: float) -> bool:
    return abs(a - b) <= SAME * max(a, b)


def plan_resolution(input_m: float, card: ModelCard, model_name: str = "the model") -> ResolutionPlan:
    """At which resolution each pass works, for an input of ``input_m`` metres per pixel.

    - The coarse segmenter recognises objects, which needs them at the scale it learnt: inside the model's
      range it runs on the input as it is, outside it on a copy resampled to the working resolution (area
      averaging when shrinking), the resolution its training centred on.
    - The refiner decides where boundaries run, so every pixel of detail it keeps counts: it works as close
      to the input's own resolution as its training allows, i.e. the input's pixel size clamped to the
      range. Within range that is the input's own grid (no resampling at all); for a finer input (a 5 cm
      drone mosaic) the range's lower end, the finest resolution the model is valid at, which keeps the
      most boundary detail the model can still read; for a coarser input the range's upper end (upsampling
      further would add pixels, not information, and cost their square).
    - The output is always written on the input's grid (nearest: each input pixel takes the class decided
      for the working pixel that contains its centre).

    Raises IdgbrError for inputs coarser than ``MAX_PIXEL_SIZE_M``, naming their resolution and the range."""
    low, high = pixel_size_range(card)
    working = working_pixel_size(card)
    if not math.isfinite(input_m) or input_m <= 0:
        raise IdgbrError(f"INPUT's pixel size {input_m!r} m is not a size; give --pixel-size METRES.")
    if input_m > MAX_PIXEL_SIZE_M:
        raise IdgbrError(f"INPUT is {metres(input_m)} m per pixel; {model_name} {range_text(card)} and cannot work "
                         f"on rasters coarser than {MAX_PIXEL_SIZE_M:g} m. Use finer imagery, or give --pixel-size "
                         "METRES if the raster's georeference is wrong; nothing was written.")
    inside = low * (1 - SAME) <= input_m <= high * (1 + SAME)
    coarse = input_m if inside else working
    refine = min(max(input_m, low), high)
    result = ResolutionPlan(input_m=input_m, coarse_m=coarse, refine_m=refine, low_m=low, high_m=high,
                            working_m=working)
    if not inside:
        side = "finer" if input_m < low else "coarser"
        result.notes.append(f"INPUT at {metres(input_m)} m per pixel is {side} than {model_name}'s range "
                            f"({metres(low)} to {metres(high)} m): it is resampled for the model and the result "
                            "brought back to INPUT's grid.")
    return result
