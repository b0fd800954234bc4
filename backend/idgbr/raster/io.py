"""GeoTIFF input and output: opening with clear errors, the processing window (--extent), masks, the
external coarse map, and the atomically written outputs (styled class ids, refiner confidence)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import warnings
import zlib
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..classes import hex_to_rgb
from ..errors import IdgbrError
from ..procs import pid_alive
from .windows import OUTPUT_BLOCK

try:  # the exceptions GDAL's errors arrive as (rasterio chains them as the cause of RasterioIOError)
    from rasterio._err import CPLE_BaseError
except ImportError:  # pragma: no cover - a rasterio that moved it
    CPLE_BaseError = RasterioError
GDAL_ERRORS = (RasterioError, CPLE_BaseError)

NODATA = 255  # output value where the input is nodata or masked; never a class id (at most 255 classes)
CONFIDENCE_NODATA = -1.0  # confidence output where the class output is nodata (a probability is never negative)
GDAL_ENV = {
    # GDAL's block cache defaults to 5 % of RAM; bound it so memory does not grow with the raster.
    "GDAL_CACHEMAX": 64,
    "GDAL_TIFF_INTERNAL_MASK": True,
}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp makes 0600 files; results should get the usual permissions (0666 less the umask), like any other
# file the user writes. Read once at import: os.umask cannot be queried without setting it.
FILE_MODE = 0o666 & ~_read_umask()


def gdal_env() -> rasterio.Env:
    return rasterio.Env(**GDAL_ENV)


# ------------------------------------------------------------------------------------------------------------
# Messages
# ------------------------------------------------------------------------------------------------------------
MB = 1024 * 1024


def plain(value: float) -> str:
    """A coordinate in plain notation (2789500, 55.200012), never 2.79e+06."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def crs_name(crs: CRS | None) -> str:
    if crs is None:
        return "no CRS"
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()


def bounds_text(bounds: tuple[float, float, float, float], crs: CRS | None) -> str:
    """"xmin,ymin,xmax,ymax (EPSG:32640)"."""
    return ",".join(plain(v) for v in bounds) + f" ({crs_name(crs)})"


def gdal_message(exc: BaseException) -> str:
    """GDAL's own words for a failure: rasterio raises "Read failed. See previous exception" with the
    useful message as the cause."""
    if isinstance(exc, GDAL_ERRORS) and isinstance(exc.__cause__, GDAL_ERRORS):
        return str(exc.__cause__)
    return str(exc)


def damaged(what: str, path: str | Path, exc: BaseException) -> IdgbrError:
    """The error for a raster that opened but cannot be read (truncated, corrupt, or gone)."""
    return IdgbrError(f"{what} is damaged or truncated: {path} cannot be read ({gdal_message(exc)}). Copy or "
                      "download it again (gdalinfo -checksum reads every block and shows whether it is whole).")


def free_space(folder: Path) -> int | None:
    """Bytes this user may still write on the device of FOLDER (None: unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------------------
# Temporary files beside the outputs
# ------------------------------------------------------------------------------------------------------------
# Every temporary file a run makes beside an output is named ".<output name>.<pid>-<host>.<random><suffix>":
# the GeoTIFF being written (.tmp.tif, GDAL may add .tmp.tif.aux.xml), its category-name sidecar
# (.tmp.tif.cat.xml), the write probe (.probe) and, for an instant while the outputs are swapped in, the
# previous output (.old). A later run in the folder removes those whose process is gone (remove_stale_temps).
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')) & 0xFFFF:04x}"
TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{4})\.[a-z0-9_]+"
                       r"\.(?:tmp\.tif(?:\.aux\.xml|\.cat\.xml)?|probe|old)$")
# The naming before the pid and host were added: only the age tells whether such a file is still in use.
LEGACY_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp\.tif(?:\.aux\.xml|\.cat\.xml)?$")
STALE_AGE_S = 24 * 3600

_live_temps: set[Path] = set()  # temporary files of this process's unfinished outputs
_live_lock = threading.Lock()


def temp_path(output: Path, suffix: str) -> Path:
    """A new empty file beside OUTPUT, named after it, this process and this host."""
    output = Path(output)
    folder = output.parent if str(output.parent) else Path(".")
    handle, name = tempfile.mkstemp(prefix=f".{output.name}.{os.getpid()}-{HOST_TAG}.", suffix=suffix, dir=folder)
    os.close(handle)
    return Path(name)


def _track(paths: list[Path], live: bool) -> None:
    with _live_lock:
        (_live_temps.update if live else _live_temps.difference_update)(paths)


def remove_live_temps() -> None:
    """Remove the temporary files of every output still being written (the service calls this when it must
    exit before a job could clean up after itself)."""
    with _live_lock:
        paths = list(_live_temps)
        _live_temps.clear()
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove what interrupted runs (killed, crashed, powered off) left in FOLDER, returning what was removed.

    Only files of our own naming are touched. One made on this host is stale when the process in its name no
    longer runs; one from another host (a shared folder), or named the old way without a process id, when
    nothing changed it for a day. A previous output that was moved aside (.old) is put back when its place is
    empty, else removed."""
    removed: list[Path] = []
    try:
        with os.scandir(folder) as listing:
            entries = [e for e in listing if e.name.startswith(".")]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = TEMP_NAME.match(entry.name)
        if match is None and not LEGACY_TEMP_NAME.match(entry.name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if match is not None and match["host"] == HOST_TAG:
            pid = int(match["pid"])
            if pid == os.getpid() or pid_alive(pid):
                continue
        elif age < STALE_AGE_S:
            continue
        path = Path(entry.path)
        try:
            if match is not None and entry.name.endswith(".old"):
                target = path.with_name(match["target"])
                if not os.path.lexists(target):
                    os.replace(path, target)
                    continue
            path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed


def open_raster(path: Path, what: str = "INPUT") -> rasterio.io.DatasetReader:
    """Open a raster for reading; missing files and non-rasters get a message naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise IdgbrError(f"{what} not found: {path}. Check the path (and the working folder).")
    if path.is_dir():
        raise IdgbrError(f"{what} is a folder, not a raster file: {path}. Give a GeoTIFF or another GDAL raster.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as exc:
        raise IdgbrError(f"{what} is not a raster GDAL can read: {path} ({exc}). Give a GeoTIFF or another "
                         "GDAL-readable raster.") from exc


def same_file(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or (Path(b).exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output(output: Path, inputs: list[tuple[str, Path]], what: str = "OUTPUT") -> None:
    """Fail before any work when an output (``what`` names it) cannot be written or would overwrite one of
    ``inputs`` (name, path)."""
    output = Path(output)
    lead = what[:1].upper() + what[1:]  # at the start of a sentence
    for name, path in inputs:
        if path is not None and same_file(path, output):
            raise IdgbrError(f"{lead} is the same file as {name} ({path}); {name} would be destroyed. "
                             f"Choose another path for {what}.")
    if output.is_dir():
        raise IdgbrError(f"{lead} is a folder: {output}. Give a file name such as {output / 'refined.tif'}.")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise IdgbrError(f"The folder for {what} does not exist: {folder}. Create it or choose another path.")
    try:
        temp_path(output, ".probe").unlink()
    except OSError as exc:
        raise IdgbrError(f"Cannot write {what} in {folder} ({exc.strerror or exc}). Choose a folder you can "
                         "write to.") from exc
    if output.exists() and not os.access(output, os.W_OK):
        raise IdgbrError(f"{lead} exists and is read-only: {output}. Remove it or choose another path.")


def parse_extent(text: str) -> tuple[float, float, float, float]:
    """"xmin,ymin,xmax,ymax" (the command line form) -> four floats."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise IdgbrError(f"--extent must be four numbers XMIN,YMIN,XMAX,YMAX (got {text!r}).") from exc
    if len(values) != 4:
        raise IdgbrError(f"--extent must be four numbers XMIN,YMIN,XMAX,YMAX (got {len(values)}: {text!r}).")
    return values


def parse_crs(text: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise IdgbrError(f"Unknown CRS {text!r} for the extent ({exc}). Use a code such as EPSG:4326.") from exc


def window_bounds(src: rasterio.io.DatasetReader, window: Window) -> tuple[float, float, float, float]:
    """xmin, ymin, xmax, ymax of a pixel window in the raster's coordinates (any orientation)."""
    xs, ys = zip(*(src.transform * (c, r) for c in (window.col_off, window.col_off + window.width)
                   for r in (window.row_off, window.row_off + window.height)))
    return min(xs), min(ys), max(xs), max(ys)


def extent_window(src: rasterio.io.DatasetReader, extent: tuple[float, float, float, float] | None,
                  extent_crs: str | None) -> tuple[Window, str | None]:
    """The pixel window to process: the whole raster, or the extent snapped outward to the pixel grid and
    clipped to the raster; and a note for the run when the extent reached beyond the raster (None else)."""
    full = Window(0, 0, src.width, src.height)
    if extent is None:
        return full, None
    if len(extent) != 4 or not all(math.isfinite(float(v)) for v in extent):
        raise IdgbrError(f"The extent must be four finite numbers xmin, ymin, xmax, ymax (got {extent!r}).")
    xmin, ymin, xmax, ymax = (float(v) for v in extent)
    given = ",".join(plain(v) for v in (xmin, ymin, xmax, ymax)) + (f" in {extent_crs}" if extent_crs else "")
    if xmax <= xmin or ymax <= ymin:
        raise IdgbrError(f"The extent {given} has zero or negative size: give XMIN,YMIN,XMAX,YMAX with XMIN < XMAX "
                         "and YMIN < YMAX.")
    if extent_crs:
        target = parse_crs(extent_crs)
        if src.crs is None:
            raise IdgbrError(f"INPUT has no CRS, so an extent in {extent_crs} cannot be placed on it. Give the "
                             "extent in the raster's own coordinates without an extent CRS, or assign a CRS to "
                             "the raster first (e.g. gdal_edit.py -a_srs).")
        if target != src.crs:
            xmin, ymin, xmax, ymax = transform_bounds(target, src.crs, xmin, ymin, xmax, ymax, densify_pts=21)
    # Corners through the inverse transform handle any orientation (north-up, south-up, pixel coordinates).
    inverse = ~src.transform
    cols, rows = zip(*(inverse * (x, y) for x in (xmin, xmax) for y in (ymin, ymax)))
    eps = 1e-6  # float noise must not add a whole pixel row or column
    col0, col1 = math.floor(min(cols) + eps), math.ceil(max(cols) - eps)
    row0, row1 = math.floor(min(rows) + eps), math.ceil(max(rows) - eps)
    c0, c1 = max(col0, 0), min(col1, src.width)
    r0, r1 = max(row0, 0), min(row1, src.height)
    if c1 <= c0 or r1 <= r0:
        raise IdgbrError(f"The extent {given} does not overlap INPUT (extent "
                         f"{bounds_text(window_bounds(src, full), src.crs)}). Give an extent inside the raster.")
    window = Window(c0, r0, c1 - c0, r1 - r0)
    if (c0, r0, c1, r1) == (col0, row0, col1, row1):
        return window, None
    return window, (f"The extent {given} reaches beyond INPUT: only its part inside the raster is processed, "
                    f"{bounds_text(window_bounds(src, window), src.crs)}.")


def has_masks(src: rasterio.io.DatasetReader, bands: list[int]) -> bool:
    """True when any of ``bands`` has nodata, an internal/external mask or an alpha band."""
    return any(MaskFlags.all_valid not in src.mask_flag_enums[b - 1] for b in bands)


def read_pixels(src: rasterio.io.DatasetReader, bands: list[int], window: Window, masked: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(C, H, W) raw values and the (H, W) validity (None: all valid). As in GDAL's dataset mask, a pixel
    is invalid only when every band used is nodata or masked: a single 0 in one band of an RGB image with
    nodata 0 is usually a real dark pixel."""
    try:
        pixels = src.read(bands, window=window)
        if not masked:
            return pixels, None
        valid = src.read_masks(bands, window=window).max(axis=0) > 0
    except GDAL_ERRORS as exc:
        raise damaged("INPUT", src.name, exc) from exc
    return pixels, valid


class CoarseSource:
    """An external class-id raster read window by window on the input's grid (resampled nearest when its
    grid differs), with its nodata as invalid."""

    what = "The coarse map"

    def __init__(self, path: Path, src: rasterio.io.DatasetReader, num_classes: int) -> None:
        self.path = Path(path)
        self.src = src
        self.raster = open_raster(self.path, self.what)
        self.num_classes = num_classes
        if self.raster.count < 1:
            raise IdgbrError(f"The coarse map {self.path} has no bands.")
        self.dtype = self.raster.dtypes[0]
        if not (np.issubdtype(np.dtype(self.dtype), np.integer) or np.issubdtype(np.dtype(self.dtype), np.floating)):
            raise IdgbrError(f"The coarse map {self.path} has data type {self.dtype}; give a raster of class ids.")
        self.nodata = self.raster.nodata
        same_grid = (self.raster.width == src.width and self.raster.height == src.height
                     and self.raster.transform.almost_equals(src.transform)
                     and (self.raster.crs == src.crs or self.raster.crs is None or src.crs is None))
        self.resampled = not same_grid
        if same_grid:
            self.reader = self.raster
        else:
            if src.crs is None or self.raster.crs is None:
                raise IdgbrError(f"The coarse map {self.path} is on a different pixel grid from INPUT and one of "
                                 "them has no CRS, so it cannot be resampled. Give a coarse map on the input's "
                                 "grid, or georeference both.")
            nodata = self.nodata if self.nodata is not None else NODATA
            try:
                self.reader = WarpedVRT(self.raster, crs=src.crs, transform=src.transform, width=src.width,
                                        height=src.height, resampling=Resampling.nearest, nodata=nodata)
            except GDAL_ERRORS as exc:
                raise damaged(self.what, self.path, exc) from exc
            self.nodata = nodata

    def coverage(self, window: Window) -> str | None:
        """Refuse a coarse map that does not overlap the processed window (its output would be all nodata),
        naming both extents; a note when it covers only part of the window, else None."""
        if not self.resampled:
            return None
        area = window_bounds(self.src, window)
        own = self.raster.bounds
        try:
            left, bottom, right, top = transform_bounds(self.raster.crs, self.src.crs, *own, densify_pts=21)
        except GDAL_ERRORS as exc:
            raise IdgbrError(f"The coarse map {self.path} cannot be placed on INPUT's CRS "
                             f"{crs_name(self.src.crs)} ({exc}).") from exc
        whole = window.width == self.src.width and window.height == self.src.height
        place = "INPUT" if whole else "the processed area of INPUT"
        if left >= area[2] or right <= area[0] or bottom >= area[3] or top <= area[1]:
            raise IdgbrError(f"The coarse map {self.path} does not overlap {place}: the coarse map covers "
                             f"{bounds_text((own.left, own.bottom, own.right, own.top), self.raster.crs)}, "
                             f"{place} {bounds_text(area, self.src.crs)}. Give the coarse map of this area.")
        if left > area[0] or bottom > area[1] or right < area[2] or top < area[3]:
            return (f"The coarse map {self.path.name} covers only part of {place} "
                    f"({bounds_text(area, self.src.crs)}): outside it the output is nodata.")
        return None

    def _read(self, window: Window, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        try:
            if out_shape is None:
                raw = self.reader.read(1, window=window)
                valid = self.reader.read_masks(1, window=window) > 0
            else:  # another grid's window (raster.resample.GridCoarse): class ids are never averaged
                raw = self.reader.read(1, window=window, out_shape=out_shape, resampling=Resampling.nearest)
                valid = self.reader.read_masks(1, window=window, out_shape=out_shape,
                                               resampling=Resampling.nearest) > 0
        except GDAL_ERRORS as exc:
            raise damaged(self.what, self.path, exc) from exc
        if self.nodata is not None:
            valid &= raw != self.nodata
        return raw, valid

    def read(self, window: Window, out_shape: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) int64 ids (invalid pixels hold 0) and (H, W) validity; with ``out_shape`` the (fractional)
        window read at that size, nearest."""
        raw, valid = self._read(window, out_shape)
        ids = np.where(valid, raw, 0)
        return ids.astype(np.int64), valid

    def validate(self, window: Window, rows_per_read: int = 1024) -> None:
        """Fail before any work on ids outside 0..K-1 (other than nodata), naming the ids found."""
        bad: set[float] = set()
        for row in range(0, int(window.height), rows_per_read):
            part = Window(window.col_off, window.row_off + row, window.width,
                          min(rows_per_read, int(window.height) - row))
            raw, valid = self._read(part)
            values = raw[valid]
            if values.dtype.kind == "f":
                fractional = values[values != np.round(values)]
                if fractional.size:
                    raise IdgbrError(f"The coarse map {self.path} holds non-integer values (e.g. "
                                     f"{fractional[0]:g}); give a raster of class ids 0..{self.num_classes - 1}.")
            outside = values[(values < 0) | (values >= self.num_classes)]
            if outside.size:
                bad.update(np.unique(outside).tolist())
                if len(bad) > 20:
                    break
        if bad:
            shown = ", ".join(f"{v:g}" for v in sorted(bad)[:20]) + (" ..." if len(bad) > 20 else "")
            raise IdgbrError(f"The coarse map {self.path} holds class ids {shown}, outside this model's classes "
                             f"0..{self.num_classes - 1}. Give a map with the model's class ids (set its nodata "
                             "value for unlabelled pixels), or choose a model with matching classes.")

    def close(self) -> None:
        if self.reader is not self.raster:
            self.reader.close()
        self.raster.close()


def colormap(classes: list[dict]) -> dict[int, tuple[int, int, int, int]]:
    table = {int(c["id"]): (*hex_to_rgb(c["color"]), 255) for c in classes}
    table[NODATA] = (0, 0, 0, 0)
    return table


def category_names_xml(classes: list[dict]) -> str:
    """GDAL's PAM sidecar with category names: GeoTIFF has no tag for them, GDAL and QGIS read them here."""
    by_id = {int(c["id"]): str(c["name"]) for c in classes}
    names = [by_id.get(i, "") for i in range(max(by_id) + 1)] if by_id else []
    rows = "\n".join(f"      <Category>{escape(n)}</Category>" for n in names)
    return ("<PAMDataset>\n  <PAMRasterBand band=\"1\">\n    <CategoryNames>\n" + rows +
            "\n    </CategoryNames>\n  </PAMRasterBand>\n</PAMDataset>\n")


def verify_geotiff(path: Path, shape: tuple[int, int], dtype: str) -> None:
    """Re-open a GeoTIFF just written and read every block back, so a file that GDAL could not finish (a full
    disk, a size limit, a removed drive; GDAL reports some of these only on its error stream) is never
    taken for a result. Raises OSError."""
    if path.stat().st_size == 0:
        raise OSError("the file written is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as written:
                if (written.height, written.width) != shape or written.count != 1 or written.dtypes[0] != dtype:
                    raise OSError(f"the file written reads as {written.count} x {written.height} x {written.width} "
                                  f"{written.dtypes[0]}, not 1 x {shape[0]} x {shape[1]} {dtype}")
                for _, block in written.block_windows(1):
                    written.read(1, window=block)
    except GDAL_ERRORS as exc:
        raise OSError(f"the file written is incomplete when read back: {gdal_message(exc)}") from exc


def swap_in(replacements: list[tuple[Path, Path | None]]) -> None:
    """Put each new file in place of its target (None: the target is removed), all or none: the targets
    that exist are first moved aside and, if any step fails, the new files are taken away again and the
    old ones put back. Raises OSError."""
    aside: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    try:
        for target, _ in replacements:
            if os.path.lexists(target):
                backup = temp_path(target, ".old")
                os.replace(target, backup)
                aside.append((target, backup))
        for target, new in replacements:
            if new is not None:
                os.replace(new, target)
                placed.append(target)
    except BaseException:
        for target in placed:
            with contextlib.suppress(OSError):
                target.unlink()
        for target, backup in reversed(aside):
            with contextlib.suppress(OSError):
                os.replace(backup, target)
        raise
    for _, backup in aside:
        with contextlib.suppress(OSError):
            backup.unlink()


class GeoTiffWriter:
    """One single-band GeoTIFF on the window's grid, written to a temporary file beside ``output``;
    ``commit_all`` verifies it and renames it into place; ``abort`` (or leaving the ``with`` block on an
    exception) removes it, so a failed or cancelled run leaves nothing behind. Every GDAL error while
    writing becomes an IdgbrError that names the output (and a full disk as such). ``OutputWriter`` (class
    ids) and ``ConfidenceWriter`` (float32 probabilities) differ only in what they pass here."""

    def __init__(self, output: Path, src: rasterio.io.DatasetReader, window: Window, *, what: str, dtype: str,
                 nodata: float, description: str, tags: dict[str, str], band_tags: dict[str, str] | None = None,
                 colormap: dict[int, tuple[int, int, int, int]] | None = None, sidecar: str | None = None) -> None:
        self.output = Path(output)
        self.what = what  # the output in messages: "OUTPUT", "the confidence output (--confidence)"
        self.sidecar = sidecar  # GDAL PAM XML installed as OUTPUT.aux.xml on commit (None: no sidecar)
        try:
            self.tmp = temp_path(self.output, ".tmp.tif")
        except OSError as exc:
            raise IdgbrError(f"Could not create a temporary file for {what} beside {self.output} "
                             f"({exc.strerror or exc}). Check that the folder is writable and not full.") from exc
        self.sidecar_tmp = Path(str(self.tmp) + ".cat.xml")
        self.temps = [self.tmp, Path(str(self.tmp) + ".aux.xml"), self.sidecar_tmp]
        _track(self.temps, live=True)
        width, height = int(window.width), int(window.height)
        self.shape, self.dtype = (height, width), dtype
        self.nbytes = width * height * np.dtype(dtype).itemsize  # uncompressed: the most the file can need
        georeferenced = src.crs is not None or not src.transform.is_identity
        floating = np.issubdtype(np.dtype(dtype), np.floating)
        profile = {
            "driver": "GTiff", "dtype": dtype, "count": 1, "width": width, "height": height,
            "nodata": nodata, "compress": "deflate", "predictor": 3 if floating else 2, "BIGTIFF": "IF_SAFER",
        }
        # Tiny outputs cannot hold 256-px tiles; GDAL wants tiles no larger than needed, so use strips there.
        if width >= OUTPUT_BLOCK and height >= OUTPUT_BLOCK:
            profile.update(tiled=True, blockxsize=OUTPUT_BLOCK, blockysize=OUTPUT_BLOCK)
        if georeferenced:
            profile.update(crs=src.crs, transform=src.window_transform(window))
        self.dataset = None
        try:
            os.chmod(self.tmp, FILE_MODE)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.dataset = rasterio.open(self.tmp, "w", **profile)
            if colormap is not None:
                self.dataset.write_colormap(1, colormap)
            self.dataset.set_band_description(1, description)
            self.dataset.update_tags(**tags)
            if band_tags:
                self.dataset.update_tags(1, **band_tags)
        except (*GDAL_ERRORS, OSError) as exc:
            error = self.write_error(exc)
            self._remove()
            raise error from exc
        except BaseException:
            self._remove()
            raise

    def write(self, values: np.ndarray, row: int, col: int) -> None:
        assert self.dataset is not None  # opened in __init__
        try:
            self.dataset.write(values[None], window=Window(col, row, values.shape[1], values.shape[0]))
        except GDAL_ERRORS as exc:
            raise self.write_error(exc) from exc

    def write_error(self, exc: BaseException) -> IdgbrError:
        """The message for a failed write: a full disk as such (measured now, before the temporary file is
        removed), anything else with GDAL's or the system's words."""
        folder = self.tmp.parent
        free = free_space(folder)
        if free is not None and free < self.nbytes:
            return IdgbrError(f"No space left on the device of {self.what} ({folder}): up to "
                              f"{max(self.nbytes / MB, 0.1):.1f} MB needed, {free / MB:.1f} MB free. Free some space "
                              "or choose another folder; nothing was written.")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else gdal_message(exc)
        return IdgbrError(f"Could not write {self.what} {self.output} ({reason}). The disk may be full or gone, or "
                          "the file too large for the file system or a file size limit (ulimit -f); nothing was "
                          "written.")

    def finish(self) -> None:
        """Close the temporary file, check that all of it reached the disk and write the sidecar's temporary
        file: after this only renames are left. Raises IdgbrError."""
        assert self.dataset is not None  # opened in __init__
        try:
            self.dataset.close()
            verify_geotiff(self.tmp, self.shape, self.dtype)
            Path(str(self.tmp) + ".aux.xml").unlink(missing_ok=True)
            if self.sidecar is not None:
                data = self.sidecar.encode("utf-8")
                self.sidecar_tmp.write_bytes(data)
                os.chmod(self.sidecar_tmp, FILE_MODE)
                if self.sidecar_tmp.stat().st_size != len(data):
                    raise OSError(f"{self.sidecar_tmp.name} is short")
        except (*GDAL_ERRORS, OSError) as exc:
            raise self.write_error(exc) from exc

    def replacements(self) -> list[tuple[Path, Path | None]]:
        """(target, new file or None to remove) for ``swap_in``: the GeoTIFF, and its .aux.xml (ours, or the
        statistics of a file this one replaces removed)."""
        aux = Path(str(self.output) + ".aux.xml")
        return [(self.output, self.tmp), (aux, self.sidecar_tmp if self.sidecar is not None else None)]

    def _remove(self) -> None:
        if self.dataset is not None:
            with contextlib.suppress(Exception):
                self.dataset.close()
        for path in self.temps:
            with contextlib.suppress(OSError):
                path.unlink()
        _track(self.temps, live=False)

    def abort(self) -> None:
        self._remove()

    def __enter__(self) -> GeoTiffWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class OutputWriter(GeoTiffWriter):
    """The class-id GeoTIFF: uint8, nodata 255, the classes' colour table, band tags with the class names
    and a PAM sidecar with category names."""

    def __init__(self, output: Path, src: rasterio.io.DatasetReader, window: Window, classes: list[dict],
                 tags: dict[str, str]) -> None:
        self.classes = classes
        names = {f"CLASS_{int(c['id'])}": str(c["name"]) for c in classes}
        super().__init__(output, src, window, what="OUTPUT", dtype="uint8", nodata=NODATA, description="class id",
                         tags=tags, band_tags={"IDGBR_CLASSES": json.dumps(classes), **names},
                         colormap=colormap(classes), sidecar=category_names_xml(classes))


class ConfidenceWriter(GeoTiffWriter):
    """The refiner's confidence: float32, the probability (0..1) of the class written at each pixel,
    ``CONFIDENCE_NODATA`` where the class output is nodata."""

    def __init__(self, output: Path, src: rasterio.io.DatasetReader, window: Window, tags: dict[str, str]) -> None:
        super().__init__(output, src, window, what="the confidence output (--confidence)", dtype="float32",
                         nodata=CONFIDENCE_NODATA, description="refiner confidence", tags=tags)


def commit_all(writers: list[GeoTiffWriter]) -> None:
    """Put the outputs of one run in place, all or none: every temporary file is closed and verified first,
    then all are swapped in together. On any failure the previous outputs (and their .aux.xml) are left
    exactly as they were, and the caller's ``with`` blocks remove the temporary files. Raises IdgbrError."""
    for writer in writers:
        writer.finish()
    replacements = [pair for writer in writers for pair in writer.replacements()]
    try:
        swap_in(replacements)
    except OSError as exc:
        names = " and ".join(str(w.output) for w in writers)
        raise IdgbrError(f"Could not move the result into place at {names} ({exc.strerror or exc}); the previous "
                         "files there are unchanged. Check that they are not open in another program and that the "
                         "folder is writable.") from exc
    for writer in writers:
        _track(writer.temps, live=False)
