"""Which input bands feed the model, and how non-8-bit values are brought to the model's 8-bit units."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from ..card import ModelCard
from ..errors import IdgbrError
from .io import GDAL_ERRORS, damaged

log = logging.getLogger("idgbr")

STATS_MAX_SIDE = 1024  # the decimated read for percentile statistics is at most this many pixels a side
LOW_PERCENTILE, HIGH_PERCENTILE = 2.0, 98.0


def parse_bands(text: str) -> list[int]:
    """"1,2,3" -> [1, 2, 3] (for the command line)."""
    try:
        bands = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as exc:
        raise IdgbrError(f"--bands must be comma-separated band numbers such as 1,2,3 (got {text!r}).") from exc
    if not bands:
        raise IdgbrError("--bands is empty: give band numbers such as 1,2,3.")
    return bands


def select_bands(band_count: int, card: ModelCard, requested: list[int] | None,
                 input_name: str = "INPUT") -> list[int]:
    """The 1-based input bands in the model's band order, checked against the raster and the model."""
    names = list(card.bands or ["band"] * card.channels)
    needed = len(names)
    bands = list(requested) if requested else list(card.bands_default or range(1, needed + 1))
    example = ",".join(str(min(i + 1, band_count)) for i in range(needed))
    if len(bands) != needed:
        raise IdgbrError(f"The model needs {needed} bands ({', '.join(names)}) but {len(bands)} were given "
                         f"({','.join(map(str, bands))}). Give --bands with {needed} band numbers, e.g. "
                         f"--bands {example}.")
    bad = [b for b in bands if b < 1 or b > band_count]
    if bad:
        if band_count < needed and not requested:
            repeat = ",".join(["1"] * needed)
            raise IdgbrError(f"{input_name} has {band_count} band{'s' if band_count != 1 else ''} but the model "
                             f"needs {needed} ({', '.join(names)}). Give --bands to say which input band feeds "
                             f"each of them, e.g. --bands {repeat} to use band 1 for all.")
        raise IdgbrError(f"Band {', '.join(map(str, bad))} does not exist: {input_name} has {band_count} "
                         f"band{'s' if band_count != 1 else ''}. Give --bands with numbers from 1 to {band_count} "
                         f"in the order {', '.join(names)}, e.g. --bands {example}.")
    return bands


@dataclass
class PixelScaler:
    """Maps raw band values to 8-bit units (0..255). Identity for 8-bit data; otherwise a linear stretch of
    each band's robust 2-98 % range, since 16-bit or float imagery has no fixed white point."""

    low: np.ndarray | None = None  # per band, None for 8-bit input
    high: np.ndarray | None = None
    note: str | None = None  # the log line that says what was done

    @property
    def identity(self) -> bool:
        return self.low is None

    def to_8bit(self, pixels: np.ndarray) -> np.ndarray:
        """(C, H, W) raw values -> float32 in 0..255."""
        values = pixels.astype(np.float32, copy=False)
        if self.identity:
            return values
        assert self.low is not None and self.high is not None  # set together by make_scaler
        low = self.low[:, None, None]
        span = (self.high - self.low)[:, None, None]
        return np.clip((values - low) * (255.0 / span), 0.0, 255.0)


def make_scaler(src: rasterio.io.DatasetReader, bands: list[int], input_name: str = "INPUT") -> PixelScaler:
    dtypes = {src.dtypes[b - 1] for b in bands}
    if dtypes == {"uint8"}:
        return PixelScaler()
    # Statistics over the whole raster (not just an --extent), so a window gives the same result as a full
    # run; a decimated read (GDAL uses overviews when present) keeps this cheap and bounded in memory.
    scale = max(1.0, max(src.height, src.width) / STATS_MAX_SIDE)
    out_h, out_w = max(1, int(round(src.height / scale))), max(1, int(round(src.width / scale)))
    try:
        sample = src.read(bands, out_shape=(len(bands), out_h, out_w), resampling=Resampling.nearest, masked=True,
                          window=Window(0, 0, src.width, src.height))
    except GDAL_ERRORS as exc:
        raise damaged(input_name, src.name, exc) from exc
    low = np.zeros(len(bands), dtype=np.float32)
    high = np.ones(len(bands), dtype=np.float32)
    for i in range(len(bands)):
        band = sample[i]
        values = band.compressed() if np.ma.is_masked(band) else np.asarray(band).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            continue
        lo, hi = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE]).astype(np.float32)
        low[i], high[i] = lo, hi if hi > lo else lo + 1.0
    ranges = ", ".join(f"band {b}: {lo:g}..{hi:g}" for b, lo, hi in zip(bands, low, high))
    note = (f"{input_name} is {'/'.join(sorted(dtypes))}, not 8-bit: each band is stretched to 0..255 from robust "
            f"statistics (its {LOW_PERCENTILE:g}-{HIGH_PERCENTILE:g} % percentiles on a decimated read; {ranges}) "
            "before the model card's normalisation.")
    return PixelScaler(low, high, note)
