"""Working at another resolution than INPUT's, window by window (never the whole raster in memory).

- ``VirtualGrid``: the processed window of INPUT seen at another pixel size. It has what the tile engine,
  the writers and the coarse map need from a dataset (``width``, ``height``, ``crs``, ``transform``,
  ``window_transform``, ``read``, ``read_masks``), and each ``read`` is one resampled read of the matching
  (fractional) window of INPUT: GDAL's area average when shrinking, bilinear when enlarging.
- ``GridCoarse``: a class-id raster (an external coarse map on INPUT's grid, or the coarse pass's own
  temporary map on its grid) read on a virtual grid, nearest.
- ``UpsampledWriter``: takes rows of a virtual grid from the engine and writes them on INPUT's grid, nearest
  (each INPUT pixel takes the value of the working pixel that contains its centre), with INPUT's own mask
  applied at its own resolution; it also counts the classes written.

Why nearest on the way back, not bilinear log-probabilities then argmax: the class ids are the product of the
refiner's decisions (never-harm rules and confidence gate included), made on the grid it worked at; nearest
keeps each of them exactly, invents no class where two meet, and needs no K float planes at INPUT's (much
finer) resolution. The boundaries are as fine as the refiner's grid, which is the finest the model is valid
at (``idgbr.resolution.plan_resolution``).
"""

from __future__ import annotations

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from .io import GDAL_ERRORS, CoarseSource, GeoTiffWriter, damaged
from .windows import OUTPUT_BLOCK


def scaled_size(length: int, factor: float) -> int:
    """Pixels along an axis of ``length`` input pixels at ``factor`` input pixels per working pixel."""
    return max(1, int(round(length / factor)))


class VirtualGrid:
    """``window`` of ``src`` resampled to ``width`` x ``height`` pixels covering exactly the same area."""

    def __init__(self, src: rasterio.io.DatasetReader, window: Window, width: int, height: int) -> None:
        self.src = src
        self.window = window
        self.width, self.height = int(width), int(height)
        self.sx = float(window.width) / self.width  # input pixels per virtual pixel
        self.sy = float(window.height) / self.height
        self.crs = src.crs
        self.transform = src.window_transform(window) * Affine.scale(self.sx, self.sy)
        self.name = src.name
        self.count = src.count
        self.dtypes = src.dtypes
        self.shrinking = self.sx * self.sy > 1

    @classmethod
    def at_factor(cls, src: rasterio.io.DatasetReader, window: Window, factor: float) -> VirtualGrid:
        return cls(src, window, scaled_size(int(window.width), factor), scaled_size(int(window.height), factor))

    def window_transform(self, window: Window) -> Affine:
        return self.transform * Affine.translation(window.col_off, window.row_off)

    def source_window(self, window: Window) -> Window:
        """The (fractional) window of INPUT that a window of this grid covers, clipped to INPUT."""
        col0 = self.window.col_off + window.col_off * self.sx
        row0 = self.window.row_off + window.row_off * self.sy
        col1 = min(self.window.col_off + (window.col_off + window.width) * self.sx, float(self.src.width))
        row1 = min(self.window.row_off + (window.row_off + window.height) * self.sy, float(self.src.height))
        return Window(col0, row0, col1 - col0, row1 - row0)

    def read(self, bands: list[int], window: Window) -> np.ndarray:
        resampling = Resampling.average if self.shrinking else Resampling.bilinear
        return self.src.read(bands, window=self.source_window(window), resampling=resampling,
                             out_shape=(len(bands), int(window.height), int(window.width)))

    def read_masks(self, bands: list[int], window: Window) -> np.ndarray:
        # Averaged: a working pixel with any valid input pixel in it counts as valid (nodata at INPUT's own
        # resolution is put back by UpsampledWriter).
        return self.src.read_masks(bands, window=self.source_window(window), resampling=Resampling.average,
                                   out_shape=(len(bands), int(window.height), int(window.width)))


class GridCoarse:
    """A class-id raster on grid ``own`` (``CoarseSource``) read on grid ``target``, nearest; both grids cover
    the processed window of INPUT. ``own`` is None for a map on INPUT's own grid."""

    def __init__(self, source: CoarseSource, own: VirtualGrid | None, target: VirtualGrid) -> None:
        self.source = source
        self.own = own
        self.target = target

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) int64 ids (invalid pixels hold 0) and (H, W) validity on ``target``'s grid."""
        area = self.target.source_window(window)  # on INPUT's pixel grid
        if self.own is not None:
            w = self.own.window
            area = Window((area.col_off - w.col_off) / self.own.sx, (area.row_off - w.row_off) / self.own.sy,
                          area.width / self.own.sx, area.height / self.own.sy)
            area = Window(area.col_off, area.row_off, min(area.width, self.own.width - area.col_off),
                          min(area.height, self.own.height - area.row_off))
        return self.source.read(area, out_shape=(int(window.height), int(window.width)))

    def close(self) -> None:
        self.source.close()


def nearest_index(length: int, virtual: int) -> np.ndarray:
    """For each of ``length`` input pixels along an axis, the virtual pixel containing its centre."""
    return np.minimum(((np.arange(length) + 0.5) * (virtual / length)).astype(np.int64), virtual - 1)


class UpsampledWriter:
    """The engine's writer for a virtual grid: ``write(values, row, col)`` in the virtual grid's pixels, written
    on INPUT's window through ``target`` (a GeoTiffWriter on that window). Rows arrive top to bottom within
    each column block, and column blocks cover disjoint column ranges, so every INPUT pixel is written once."""

    CHUNK_ROWS = OUTPUT_BLOCK  # INPUT rows per write: bounds memory when a working pixel covers many input pixels

    def __init__(self, target: GeoTiffWriter, grid: VirtualGrid, nodata: float, bands: list[int] | None = None,
                 masked: bool = False, count_classes: bool = False) -> None:
        self.target = target
        self.grid = grid
        self.nodata = nodata
        self.bands = bands
        self.masked = masked and bands is not None
        self.height, self.width = int(grid.window.height), int(grid.window.width)
        self.rows = nearest_index(self.height, grid.height)
        self.cols = nearest_index(self.width, grid.width)
        self.class_hist = np.zeros(256, dtype=np.int64) if count_classes else None
        # Per column range: INPUT rows held back so that every write starts on a GeoTIFF block row (a block
        # written in two parts may be flushed from GDAL's cache in between and stored twice).
        self.pending: dict[tuple[int, int], tuple[int, np.ndarray]] = {}

    def write(self, values: np.ndarray, row: int, col: int) -> None:
        r0, r1 = (int(v) for v in np.searchsorted(self.rows, [row, row + values.shape[0]]))
        c0, c1 = (int(v) for v in np.searchsorted(self.cols, [col, col + values.shape[1]]))
        if r1 <= r0 or c1 <= c0:
            return
        col_index = self.cols[c0:c1] - col
        key = (c0, c1)
        start, held = self.pending.pop(key, (r0, None))
        # Rows up to the last whole block row are written now, the rest when the next rows arrive (or at the
        # bottom of the raster, which always comes last in a column range).
        stop_all = r1 if r1 >= self.height else max(start, (r1 // OUTPUT_BLOCK) * OUTPUT_BLOCK)
        for chunk in range(start, r1, self.CHUNK_ROWS):
            stop = min(r1, chunk + self.CHUNK_ROWS)
            lo = max(chunk, r0)
            out = values[self.rows[lo:stop] - row][:, col_index]
            if held is not None and chunk == start:
                out = np.concatenate([held, out]) if stop > lo else held
            if stop > stop_all:  # the tail past the last block row: hold it back
                keep = stop - stop_all
                if out.shape[0] > keep:
                    self._write(out[:-keep], chunk, c0, c1)
                self.pending[key] = (stop_all, out[-keep:])
                break
            self._write(out, chunk, c0, c1)

    def flush(self) -> None:
        """Write what is still held back (nothing once every column range reached the bottom)."""
        for (c0, c1), (start, held) in sorted(self.pending.items()):
            self._write(held, start, c0, c1)
        self.pending.clear()

    def _write(self, out: np.ndarray, start: int, c0: int, c1: int) -> None:
        if self.masked:
            out = np.where(self._valid(start, start + out.shape[0], c0, c1), out, np.asarray(self.nodata, out.dtype))
        if self.class_hist is not None:
            self.class_hist += np.bincount(out.ravel(), minlength=256)
        self.target.write(out, start, c0)

    def _valid(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        src, w = self.grid.src, self.grid.window
        window = Window(int(w.col_off) + c0, int(w.row_off) + r0, c1 - c0, r1 - r0)
        try:
            return src.read_masks(self.bands, window=window).max(axis=0) > 0
        except GDAL_ERRORS as exc:
            raise damaged("INPUT", src.name, exc) from exc
