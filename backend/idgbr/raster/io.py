"""GeoTIFF input and output: opening with clear errors, the processing window (--extent), masks, the
external coarse map, and the atomically written outputs (styled class ids, refiner confidence)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import CRSError, NotGeoreferencedWarning, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..classes import hex_to_rgb
from ..errors import IdgbrError
from .windows import OUTPUT_BLOCK

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
        handle, probe = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".probe", dir=folder)
        os.close(handle)
        os.unlink(probe)
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
    return values  # type: ignore[return-value]


def parse_crs(text: str) -> CRS:
    try:
        return CRS.from_user_input(text)
    except CRSError as exc:
        raise IdgbrError(f"Unknown CRS {text!r} for the extent ({exc}). Use a code such as EPSG:4326.") from exc


def extent_window(src: rasterio.io.DatasetReader, extent: tuple[float, float, float, float] | None,
                  extent_crs: str | None) -> Window:
    """The pixel window to process: the whole raster, or the extent snapped outward to the pixel grid and
    clipped to the raster."""
    full = Window(0, 0, src.width, src.height)
    if extent is None:
        return full
    if len(extent) != 4 or not all(math.isfinite(float(v)) for v in extent):
        raise IdgbrError(f"The extent must be four finite numbers xmin, ymin, xmax, ymax (got {extent!r}).")
    xmin, ymin, xmax, ymax = (float(v) for v in extent)
    if xmax <= xmin or ymax <= ymin:
        raise IdgbrError(f"The extent {xmin:g},{ymin:g},{xmax:g},{ymax:g} has zero or negative size: give "
                         "XMIN,YMIN,XMAX,YMAX with XMIN < XMAX and YMIN < YMAX.")
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
        b = src.bounds
        crs_note = f" in {extent_crs}" if extent_crs else ""
        raise IdgbrError(f"The extent {extent[0]:g},{extent[1]:g},{extent[2]:g},{extent[3]:g}{crs_note} does not "
                         f"overlap INPUT (bounds {b.left:g},{b.bottom:g},{b.right:g},{b.top:g}"
                         f"{' in ' + src.crs.to_string() if src.crs else ''}). Give an extent inside the raster.")
    return Window(c0, r0, c1 - c0, r1 - r0)


def has_masks(src: rasterio.io.DatasetReader, bands: list[int]) -> bool:
    """True when any of ``bands`` has nodata, an internal/external mask or an alpha band."""
    return any(MaskFlags.all_valid not in src.mask_flag_enums[b - 1] for b in bands)


def read_pixels(src: rasterio.io.DatasetReader, bands: list[int], window: Window, masked: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(C, H, W) raw values and the (H, W) validity (None: all valid). As in GDAL's dataset mask, a pixel
    is invalid only when every band used is nodata or masked: a single 0 in one band of an RGB image with
    nodata 0 is usually a real dark pixel."""
    pixels = src.read(bands, window=window)
    if not masked:
        return pixels, None
    valid = src.read_masks(bands, window=window).max(axis=0) > 0
    return pixels, valid


class CoarseSource:
    """An external class-id raster read window by window on the input's grid (resampled nearest when its
    grid differs), with its nodata as invalid."""

    def __init__(self, path: Path, src: rasterio.io.DatasetReader, num_classes: int) -> None:
        self.path = Path(path)
        self.raster = open_raster(self.path, "The coarse map")
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
            self.reader = WarpedVRT(self.raster, crs=src.crs, transform=src.transform, width=src.width,
                                    height=src.height, resampling=Resampling.nearest, nodata=nodata)
            self.nodata = nodata

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """(H, W) int64 ids (invalid pixels hold 0) and (H, W) validity."""
        raw = self.reader.read(1, window=window)
        valid = self.reader.read_masks(1, window=window) > 0
        if self.nodata is not None:
            valid &= raw != self.nodata
        ids = np.where(valid, raw, 0)
        return ids.astype(np.int64), valid

    def validate(self, window: Window, rows_per_read: int = 1024) -> None:
        """Fail before any work on ids outside 0..K-1 (other than nodata), naming the ids found."""
        bad: set[float] = set()
        for row in range(0, int(window.height), rows_per_read):
            part = Window(window.col_off, window.row_off + row, window.width,
                          min(rows_per_read, int(window.height) - row))
            raw = self.reader.read(1, window=part)
            valid = self.reader.read_masks(1, window=part) > 0
            if self.nodata is not None:
                valid &= raw != self.nodata
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


class GeoTiffWriter:
    """One single-band GeoTIFF on the window's grid, written to a temporary file beside ``output`` and
    renamed into place by ``commit``; ``abort`` (or leaving the ``with`` block on an exception) removes it,
    so a failed or cancelled run leaves nothing behind. ``OutputWriter`` (class ids) and
    ``ConfidenceWriter`` (float32 probabilities) differ only in what they pass here."""

    def __init__(self, output: Path, src: rasterio.io.DatasetReader, window: Window, *, dtype: str,
                 nodata: float, description: str, tags: dict[str, str], band_tags: dict[str, str] | None = None,
                 colormap: dict[int, tuple[int, int, int, int]] | None = None, sidecar: str | None = None) -> None:
        self.output = Path(output)
        self.sidecar = sidecar  # GDAL PAM XML installed as OUTPUT.aux.xml on commit (None: no sidecar)
        folder = self.output.parent if str(self.output.parent) else Path(".")
        handle, tmp = tempfile.mkstemp(prefix=f".{self.output.name}.", suffix=".tmp.tif", dir=folder)
        os.close(handle)
        self.tmp = Path(tmp)
        os.chmod(self.tmp, FILE_MODE)
        width, height = int(window.width), int(window.height)
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self.dataset = rasterio.open(self.tmp, "w", **profile)
            if colormap is not None:
                self.dataset.write_colormap(1, colormap)
            self.dataset.set_band_description(1, description)
            self.dataset.update_tags(**tags)
            if band_tags:
                self.dataset.update_tags(1, **band_tags)
        except BaseException:
            self._remove()
            raise

    def write(self, values: np.ndarray, row: int, col: int) -> None:
        self.dataset.write(values[None], window=Window(col, row, values.shape[1], values.shape[0]))

    def _remove(self) -> None:
        with contextlib.suppress(Exception):
            self.dataset.close()
        for path in (self.tmp, Path(str(self.tmp) + ".aux.xml")):
            with contextlib.suppress(OSError):
                path.unlink()

    def commit(self) -> None:
        self.dataset.close()
        Path(str(self.tmp) + ".aux.xml").unlink(missing_ok=True)
        aux = Path(str(self.output) + ".aux.xml")
        aux_tmp = Path(str(self.tmp) + ".cat.xml")
        try:
            if self.sidecar is not None:
                aux_tmp.write_text(self.sidecar, encoding="utf-8")
                os.chmod(aux_tmp, FILE_MODE)
            os.replace(self.tmp, self.output)
            if self.sidecar is not None:
                os.replace(aux_tmp, aux)
            else:
                aux.unlink(missing_ok=True)  # statistics of a file this one replaced
        except OSError as exc:
            self._remove()
            aux_tmp.unlink(missing_ok=True)
            raise IdgbrError(f"Could not move the result into place at {self.output} ({exc}). Check that the "
                             "file is not open in another program and that the folder is writable.") from exc

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
        super().__init__(output, src, window, dtype="uint8", nodata=NODATA, description="class id", tags=tags,
                         band_tags={"IDGBR_CLASSES": json.dumps(classes), **names}, colormap=colormap(classes),
                         sidecar=category_names_xml(classes))


class ConfidenceWriter(GeoTiffWriter):
    """The refiner's confidence: float32, the probability (0..1) of the class written at each pixel,
    ``CONFIDENCE_NODATA`` where the class output is nodata."""

    def __init__(self, output: Path, src: rasterio.io.DatasetReader, window: Window, tags: dict[str, str]) -> None:
        super().__init__(output, src, window, dtype="float32", nodata=CONFIDENCE_NODATA,
                         description="refiner confidence", tags=tags)


def commit_all(writers: list[GeoTiffWriter]) -> None:
    """Commit several outputs of one run: if a later one cannot be moved into place, the ones already
    committed are removed again, so a run leaves all its outputs or none."""
    done: list[GeoTiffWriter] = []
    try:
        for writer in writers:
            writer.commit()
            done.append(writer)
    except BaseException:
        for writer in done:
            for path in (writer.output, Path(str(writer.output) + ".aux.xml")):
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
