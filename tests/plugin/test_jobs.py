"""The job layer shared by the toolbox and the dock, without a backend service: what the backend is sent
(files cut in each layer's own CRS), how failures are worded for each caller, and the changed pixels."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from osgeo import gdal
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)

from idgbr_qgis.jobs import inputs
from idgbr_qgis.jobs.changes import write_changes
from idgbr_qgis.jobs.outcome import JobError, result_name, user_message
from idgbr_qgis.jobs.runner import JobRunner
from idgbr_qgis.jobs.spec import JobExtent, JobSpec
from idgbr_qgis.processing.algorithm import PARAMETER_NAMES

UTM = QgsCoordinateReferenceSystem("EPSG:32640")
MERCATOR = QgsCoordinateReferenceSystem("EPSG:3857")
X0, Y0 = 320000.0, 2790000.0  # the sample's upper-left corner (EPSG:32640, 0.5 m pixels)


class RecordingBackend:
    """Manager and client in one: records each job and what its coarse file covers, and succeeds at once."""

    def __init__(self) -> None:
        self.jobs: list[dict] = []
        self.coarse_bounds: list[QgsRectangle] = []

    def client(self) -> RecordingBackend:
        return self

    def models(self) -> list:
        return []

    def submit(self, **fields) -> str:
        self.jobs.append(fields)
        if "coarse" in fields:  # read now: the copy lives only as long as the run
            layer = QgsRasterLayer(fields["coarse"], "received", "gdal")
            assert layer.isValid()
            self.coarse_bounds.append(QgsCoordinateTransform(layer.crs(), UTM, QgsProject.instance())
                                      .transformBoundingBox(layer.extent()))
        return str(len(self.jobs))

    def wait(self, job_id, **_kwargs) -> dict:
        return {"state": "succeeded", "result": {"model": "dubai5", "classes": [], "notes": []}}


def zipped(path: Path, tmp_path: Path) -> str:
    archive = tmp_path / f"{path.stem}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, path.name)
    return f"/vsizip/{archive}/{path.name}"


def test_a_copied_coarse_layer_in_another_crs_covers_the_extent(sample_raster, sample_labels, tmp_path):
    """The coarse copy is cut in the coarse layer's own CRS, with a margin: it covers the input's window."""
    mercator_labels = tmp_path / "labels_3857.tif"
    gdal.Warp(str(mercator_labels), str(sample_labels), dstSRS="EPSG:3857", xRes=1.0, yRes=1.0,
              resampleAlg="near")
    coarse = QgsRasterLayer(zipped(mercator_labels, tmp_path), "zipped labels", "gdal")
    assert coarse.isValid() and coarse.crs() == MERCATOR
    drawn = QgsRectangle(X0 + 100.3, Y0 - 180.2, X0 + 160.9, Y0 - 120.4)  # in the input's CRS
    backend = RecordingBackend()
    spec = JobSpec(mode="refine", input=inputs.describe(QgsRasterLayer(str(sample_raster), "sample", "gdal")),
                   output=tmp_path / "refined.tif", coarse=inputs.describe(coarse, "coarse"),
                   extent=JobExtent(drawn, UTM), transform_context=QgsProject.instance().transformContext())
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    JobRunner(backend, scratch_dir=scratch).run(spec)

    (job,) = backend.jobs
    assert job["extent"] == pytest.approx([drawn.xMinimum(), drawn.yMinimum(), drawn.xMaximum(), drawn.yMaximum()])
    assert job["extent_crs"] == "EPSG:32640" and job["input"] == str(sample_raster)
    (received,) = backend.coarse_bounds
    # Covers the drawn extent with at least one input pixel to spare on every side, and is still a cut-out.
    assert received.contains(QgsRectangle(drawn.xMinimum() - 0.5, drawn.yMinimum() - 0.5,
                                          drawn.xMaximum() + 0.5, drawn.yMaximum() + 0.5))
    assert received.width() < 2 * drawn.width()
    assert list(scratch.iterdir()) == [], "the copy is removed after the run"


def test_an_extent_in_a_custom_crs_is_sent_in_the_input_crs():
    custom = QgsCoordinateReferenceSystem.fromProj("+proj=tmerc +lat_0=0 +lon_0=55 +k=1 +x_0=0 +y_0=0 "
                                                   "+ellps=WGS84 +units=m +no_defs")
    assert custom.isValid() and not custom.authid()
    to_custom = QgsCoordinateTransform(UTM, custom, QgsProject.instance())
    wanted = QgsRectangle(X0 + 10, Y0 - 60, X0 + 50, Y0 - 20)
    extent = JobExtent(to_custom.transformBoundingBox(wanted), custom)
    values, crs = extent.job_fields(UTM, QgsProject.instance().transformContext())
    assert crs == "EPSG:32640"
    sent = QgsRectangle(*values)
    assert sent.contains(wanted) and sent.width() < wanted.width() + 2
    # No CRS on the input: the numbers are its own coordinates, sent without a CRS.
    assert JobExtent(wanted, UTM).job_fields(QgsCoordinateReferenceSystem(), QgsCoordinateTransformContext())[1] \
        is None


def test_failures_point_at_the_callers_own_control():
    bands = JobError("Band 7 does not exist: INPUT has 3 bands. Give --bands with numbers from 1 to 3.", "bands")
    assert user_message(bands, PARAMETER_NAMES, "(parameter {name})").endswith("(parameter BANDS)")
    assert user_message(bands, {"bands": "Band mapping"}, "(check '{name}')").endswith("(check 'Band mapping')")
    # A message that already names the parameter, or a failure of no single parameter, is left as it is.
    extent = JobError("Choose a smaller EXTENT.", "extent")
    assert user_message(extent, PARAMETER_NAMES, "(parameter {name})") == "Choose a smaller EXTENT."
    assert user_message(JobError("No space left."), PARAMETER_NAMES, "(parameter {name})") == "No space left."


def test_result_names_say_input_and_model():
    assert result_name("dubai_sample", "refined", "dubai5") == "dubai_sample — refined (dubai5)"


def _write_ids(path: Path, ids: np.ndarray, nodata: int = 255) -> Path:
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), ids.shape[1], ids.shape[0], 1, gdal.GDT_Byte)
    dataset.SetGeoTransform((X0, 0.5, 0.0, Y0, 0.0, -0.5))
    dataset.SetProjection(UTM.toWkt())
    band = dataset.GetRasterBand(1)
    band.SetNoDataValue(nodata)
    band.WriteArray(ids)
    dataset = None
    return path


def test_changed_pixels_mark_where_the_refined_map_differs(tmp_path):
    coarse = np.zeros((20, 30), np.uint8)
    coarse[:, 15:] = 2
    refined = coarse.copy()
    refined[5:8, 14:17] = 1  # the refiner moved a boundary here
    refined[0, 0] = 255  # nodata in the output
    target = write_changes(_write_ids(tmp_path / "refined.tif", refined), _write_ids(tmp_path / "coarse.tif", coarse),
                           tmp_path / "changes.tif", QgsCoordinateTransformContext())
    dataset = gdal.Open(str(target))
    band = dataset.GetRasterBand(1)
    values, nodata = band.ReadAsArray(), band.GetNoDataValue()
    dataset = None
    assert values[0, 0] == nodata
    changed = values == 1
    expected = refined != coarse
    expected[0, 0] = False
    assert np.array_equal(changed, expected)
    assert int(changed.sum()) == 9 and np.all(values[~expected & (values != nodata)] == 0)


def test_changed_pixels_need_a_coarse_map():
    with pytest.raises(ValueError, match="coarse map"):
        JobSpec(mode="refine", input=inputs.RasterSource("x", UTM, QgsRectangle(0, 0, 1, 1), 1, 1, Path("/x.tif")),
                output=Path("/o.tif"), changes=Path("/c.tif"))
