"""Shared backend fixtures: the sample raster, a factory for small rasters cut from it (or written from an
array), and the bundled model when it is present."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.windows import Window

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_RASTER = REPO_ROOT / "resources" / "sample" / "dubai_sample.tif"
SAMPLE_LABELS = REPO_ROOT / "resources" / "sample" / "dubai_sample_labels.tif"
SHARED_DATA = REPO_ROOT.parent / "shared" / "datasets"
KEEP = object()  # "same as the source" for the raster factory

# A suite started in the background (`make test &`) inherits SIGINT ignored, and so would every run that the
# tests start, so Ctrl-C tests would wait in vain. A handler set here becomes the default in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_raster() -> Path:
    return SAMPLE_RASTER


@pytest.fixture(scope="session")
def sample_labels() -> Path:
    return SAMPLE_LABELS


@pytest.fixture(scope="session")
def geotiff_samples() -> Path:
    """The shared real GeoTIFFs (uint16 UTM, int16 EPSG:4326 with nodata); skips where they are absent."""
    folder = SHARED_DATA / "geotiff-samples"
    if not folder.is_dir():
        pytest.skip(f"shared GeoTIFF samples not found at {folder}")
    return folder


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled dubai5 model file; skips while the weights have not been committed yet."""
    from idgbr.model_bundle import default_model_path

    path = default_model_path("dubai5")
    if not path.is_file():
        pytest.skip(f"bundled model not present yet: {path}")
    return path


def write_raster(path: Path, data: np.ndarray, *, crs=None, transform=None, nodata=None, **profile) -> Path:
    """Write a (bands, rows, cols) or (rows, cols) array as a GeoTIFF."""
    data = data if data.ndim == 3 else data[None]
    options = {"driver": "GTiff", "width": data.shape[2], "height": data.shape[1], "count": data.shape[0],
               "dtype": data.dtype.name, "nodata": nodata}
    if crs is not None:
        options["crs"] = crs
    if transform is not None:
        options["transform"] = transform
    options.update(profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # rasters without georeference are wanted here
        with rasterio.open(path, "w", **options) as dst:
            dst.write(data)
    return Path(path)


@pytest.fixture
def raster_writer(tmp_path: Path) -> Callable[..., Path]:
    """write(name, array, crs=..., transform=..., nodata=..., **profile) -> path in the test's temp folder."""

    def write(name: str, data: np.ndarray, **kwargs) -> Path:
        return write_raster(tmp_path / name, data, **kwargs)

    return write


@pytest.fixture
def crop_raster(tmp_path: Path) -> Callable[..., Path]:
    """crop(width, height, col=0, row=0, source=sample, name=..., dtype=None, scale=1, crs=KEEP,
    transform=KEEP, nodata=KEEP) -> a GeoTIFF cut from ``source`` (values * scale cast to ``dtype``)."""
    counter = {"n": 0}

    def crop(width: int = 64, height: int = 64, col: int = 0, row: int = 0, *, source: Path = SAMPLE_RASTER,
             name: str | None = None, dtype: str | None = None, scale: float = 1.0, crs=KEEP, transform=KEEP,
             nodata=KEEP, bands: list[int] | None = None) -> Path:
        counter["n"] += 1
        window = Window(col, row, width, height)
        with rasterio.open(source) as src:
            data = src.read(bands, window=window) if bands else src.read(window=window)
            src_crs, src_transform, src_nodata = src.crs, src.window_transform(window), src.nodata
        if dtype is not None or scale != 1.0:
            data = (data.astype(np.float64) * scale).astype(dtype or data.dtype)
        return write_raster(tmp_path / (name or f"crop{counter['n']}.tif"), data,
                            crs=src_crs if crs is KEEP else crs,
                            transform=src_transform if transform is KEEP else transform,
                            nodata=src_nodata if nodata is KEEP else nodata)

    return crop
