"""`idgbr:refine` and `idgbr:segment` run through Processing against a real backend service.

Small extents and one diffusion step keep each run to a few seconds on a laptop CPU. Nothing here checks
how good the classes are (the weights change), only what a user would notice: grids, CRS, styling, files,
messages, cancel.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import pytest
from osgeo import gdal
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPalettedRasterRenderer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsVectorLayer,
)

pytestmark = [pytest.mark.usefixtures("idgbr_provider", "idgbr_backend"), pytest.mark.timeout(300)]

# The sample: EPSG:32640, 0.5 m pixels, upper-left corner (320000, 2790000), 1000 × 1000 px.
ORIGIN_X, ORIGIN_Y, PIXEL = 320000.0, 2790000.0, 0.5
# 64 m × 64 m = 128 × 128 px, in QGIS's "xmin,xmax,ymin,ymax [CRS]" form.
SMALL = "320100,320164,2789836,2789900 [EPSG:32640]"


def run(params: dict, feedback: QgsProcessingFeedback | None = None, alg: str = "idgbr:refine") -> dict:
    import processing

    return processing.run(alg, params, feedback=feedback or QgsProcessingFeedback())


@pytest.fixture(scope="module")
def card_classes(idgbr_backend) -> list[dict]:
    models = {m["name"]: m for m in idgbr_backend.client().models()}
    return models["dubai5"]["card"]["classes"]


def grid(path: Path) -> tuple[str, tuple[float, ...], int, int]:
    """(CRS authid, geotransform, columns, rows) of a raster, read with QGIS's GDAL."""
    dataset = gdal.Open(str(path))
    try:
        crs = QgsCoordinateReferenceSystem(dataset.GetProjection()).authid()
        return crs, dataset.GetGeoTransform(), dataset.RasterXSize, dataset.RasterYSize
    finally:
        dataset = None


def class_values(path: Path) -> set[int]:
    dataset = gdal.Open(str(path))
    try:
        band = dataset.GetRasterBand(1)
        histogram = band.GetHistogram(-0.5, 255.5, 256, include_out_of_range=False, approx_ok=False)
        return {value for value, count in enumerate(histogram) if count}
    finally:
        dataset = None


def assert_on_sample_grid(path: Path) -> None:
    crs, transform, _columns, _rows = grid(path)
    assert crs == "EPSG:32640"
    assert transform[1] == pytest.approx(PIXEL) and transform[5] == pytest.approx(-PIXEL)
    assert transform[2] == 0 and transform[4] == 0
    # The corner lies on the input's pixel edges: a whole number of pixels from the sample's origin.
    columns_off = (transform[0] - ORIGIN_X) / PIXEL
    rows_off = (ORIGIN_Y - transform[3]) / PIXEL
    assert columns_off == pytest.approx(round(columns_off), abs=1e-6)
    assert rows_off == pytest.approx(round(rows_off), abs=1e-6)


def test_refine_small_extent_with_polygons(sample_raster, tmp_path, card_classes):
    out, polygons = tmp_path / "refined.tif", tmp_path / "polygons.gpkg"
    result = run({"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "OUTPUT": str(out),
                  "OUTPUT_POLYGONS": str(polygons)})
    assert Path(result["OUTPUT"]) == out and out.is_file()
    crs, transform, columns, rows = grid(out)
    assert crs == "EPSG:32640"
    assert (columns, rows) == (128, 128)
    assert transform == pytest.approx((320100.0, PIXEL, 0.0, 2789900.0, 0.0, -PIXEL))
    ids = class_values(out)
    assert ids and ids <= {c["id"] for c in card_classes}

    layer = QgsVectorLayer(result["OUTPUT_POLYGONS"], "polygons", "ogr")
    assert layer.isValid() and layer.featureCount() > 0
    assert layer.crs().authid() == "EPSG:32640"
    names = {c["id"]: c["name"] for c in card_classes}
    seen = {(f["class_id"], f["class_name"]) for f in layer.getFeatures()}
    assert {class_id for class_id, _ in seen} == ids
    assert all(names[class_id] == name for class_id, name in seen)


def test_extent_in_another_crs_lands_on_the_input_grid(sample_raster, tmp_path):
    utm = QgsCoordinateReferenceSystem("EPSG:32640")
    wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
    wanted = QgsRectangle(320301.3, 2789501.7, 320351.1, 2789552.2)  # deliberately off the pixel edges
    to_wgs84 = QgsCoordinateTransform(utm, wgs84, QgsProject.instance())
    geographic = to_wgs84.transformBoundingBox(wanted)
    extent = (f"{geographic.xMinimum():.9f},{geographic.xMaximum():.9f},"
              f"{geographic.yMinimum():.9f},{geographic.yMaximum():.9f} [EPSG:4326]")
    out = tmp_path / "from_wgs84.tif"
    run({"INPUT": str(sample_raster), "EXTENT": extent, "STEPS": 1, "OUTPUT": str(out)})
    assert_on_sample_grid(out)
    _crs, transform, columns, rows = grid(out)
    # The output covers the geographic box (reprojected back) and at most one pixel more on each side.
    covered = to_wgs84.transformBoundingBox(geographic, QgsCoordinateTransform.ReverseTransform)
    left, top = transform[0], transform[3]
    right, bottom = left + columns * PIXEL, top - rows * PIXEL
    assert left <= covered.xMinimum() + 1e-6 and right >= covered.xMaximum() - 1e-6
    assert bottom <= covered.yMinimum() + 1e-6 and top >= covered.yMaximum() - 1e-6
    assert covered.xMinimum() - left < PIXEL + 1e-6 and right - covered.xMaximum() < PIXEL + 1e-6
    assert covered.yMinimum() - bottom < PIXEL + 1e-6 and top - covered.yMaximum() < PIXEL + 1e-6


def test_runs_in_a_background_task_like_the_toolbox(sample_raster, tmp_path):
    """The toolbox runs algorithms in a QgsTask: the main thread keeps serving events meanwhile."""
    import time

    from qgis.core import QgsApplication, QgsProcessingAlgRunnerTask
    from qgis.PyQt.QtCore import QCoreApplication, QTimer

    alg = QgsApplication.processingRegistry().createAlgorithmById("idgbr:refine")
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    feedback = QgsProcessingFeedback()
    out = tmp_path / "task.tif"
    task = QgsProcessingAlgRunnerTask(alg, {"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1,
                                            "OUTPUT": str(out)}, context, feedback)
    done: dict = {}
    task.executed.connect(lambda ok, results: done.update(ok=ok, results=results))
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    QgsApplication.taskManager().addTask(task)
    deadline = time.monotonic() + 240
    while not done and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.01)
    timer.stop()
    assert done.get("ok"), done
    assert Path(done["results"]["OUTPUT"]) == out and out.is_file()
    assert len(ticks) >= 3  # the main thread was never blocked for the whole run


def test_loaded_output_has_paletted_style_with_class_names(sample_raster, tmp_path, card_classes):
    import processing

    out = tmp_path / "styled.tif"
    project = QgsProject.instance()
    before = set(project.mapLayers())
    try:
        processing.runAndLoadResults("idgbr:refine", {"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1,
                                                      "OUTPUT": str(out)})
        added = [project.mapLayer(i) for i in set(project.mapLayers()) - before]
        rasters = [layer for layer in added if isinstance(layer, QgsRasterLayer)]
        assert len(rasters) == 1
        assert rasters[0].name() == "dubai_sample — refined (dubai5)"  # after the input and the model
        renderer = rasters[0].renderer()
        assert isinstance(renderer, QgsPalettedRasterRenderer)
        assert [(c.value, c.label, c.color.name().upper()) for c in renderer.classes()] == [
            (c["id"], c["name"], c["color"].upper()) for c in sorted(card_classes, key=lambda c: c["id"])]
    finally:
        project.removeMapLayers(list(set(project.mapLayers()) - before))


def test_confidence_output_is_loaded_as_a_styled_layer_on_the_output_grid(sample_raster, tmp_path):
    import processing
    from qgis.core import QgsSingleBandPseudoColorRenderer

    out, confidence = tmp_path / "refined.tif", tmp_path / "confidence.tif"
    project = QgsProject.instance()
    before = set(project.mapLayers())
    try:
        result = processing.runAndLoadResults("idgbr:refine", {
            "INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "BAND": 6, "VOCABULARY": -1,
            "MIN_CONFIDENCE": 0.4, "OUTPUT": str(out), "CONFIDENCE": str(confidence)})
        assert Path(result["CONFIDENCE"]) == confidence and confidence.is_file()
        added = [project.mapLayer(i) for i in set(project.mapLayers()) - before]
        loaded = [layer for layer in added if isinstance(layer, QgsRasterLayer)
                  and Path(layer.source()) == confidence]
        assert len(loaded) == 1, [layer.source() for layer in added]
        assert isinstance(loaded[0].renderer(), QgsSingleBandPseudoColorRenderer)
        assert loaded[0].dataProvider().dataType(1) == Qgis.Float32
    finally:
        project.removeMapLayers(list(set(project.mapLayers()) - before))
    assert grid(confidence) == grid(out)
    dataset = gdal.Open(str(out))
    try:
        tags = dataset.GetMetadata()
    finally:
        dataset = None
    assert (tags["IDGBR_BAND"], tags["IDGBR_VOCABULARY"], tags["IDGBR_MIN_CONFIDENCE"]) == ("6", "-1", "0.4")


def test_band_0_returns_the_coarse_map(sample_raster, sample_labels, tmp_path):
    import numpy as np

    coarse = tmp_path / "coarse.tif"
    gdal.Translate(str(coarse), str(sample_labels), srcWin=[200, 200, 128, 128], noData="none")
    dataset = gdal.Open(str(coarse), gdal.GA_Update)
    ids = dataset.GetRasterBand(1).ReadAsArray()
    ids[ids == 255] = 1  # unlabelled pixels: give them a class, so every pixel has one
    dataset.GetRasterBand(1).WriteArray(ids)
    dataset = None
    out = tmp_path / "kept.tif"
    run({"INPUT": str(sample_raster), "COARSE": str(coarse), "EXTENT": "320100,320164,2789836,2789900 [EPSG:32640]",
         "STEPS": 1, "BAND": 0, "VOCABULARY": -1, "OUTPUT": str(out)})
    dataset = gdal.Open(str(out))
    try:
        written = dataset.GetRasterBand(1).ReadAsArray()
    finally:
        dataset = None
    assert np.array_equal(written, ids)


def test_coarse_map_on_another_grid(sample_raster, sample_labels, tmp_path):
    """A class map from another model, at 1 m pixels: refined on the input's 0.5 m grid."""
    coarse = tmp_path / "coarse_1m.tif"
    gdal.Warp(str(coarse), str(sample_labels), xRes=1.0, yRes=1.0, resampleAlg="near",
              outputBounds=(320090.0, 2789820.0, 320180.0, 2789910.0))
    out = tmp_path / "refined_from_coarse.tif"
    run({"INPUT": str(sample_raster), "COARSE": str(coarse), "EXTENT": SMALL, "STEPS": 1, "OUTPUT": str(out)})
    _crs, transform, columns, rows = grid(out)
    assert transform == pytest.approx((320100.0, PIXEL, 0.0, 2789900.0, 0.0, -PIXEL))
    assert (columns, rows) == (128, 128)


def test_coarse_layer_inside_an_archive(sample_raster, sample_labels, tmp_path, load_raster):
    """A coarse map the backend cannot open (here zipped, at 1 m) is copied around the extent first."""
    coarse = tmp_path / "coarse_1m.tif"
    gdal.Warp(str(coarse), str(sample_labels), xRes=1.0, yRes=1.0, resampleAlg="near")
    archive = tmp_path / "coarse.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(coarse, "coarse.tif")
    layer = load_raster(f"/vsizip/{archive}/coarse.tif", "zipped coarse")
    out = tmp_path / "refined.tif"
    import processing

    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    processing.run("idgbr:refine", {"INPUT": str(sample_raster), "COARSE": layer, "STEPS": 1, "OUTPUT": str(out),
                                    "EXTENT": "320100.3,320163.7,2789836.2,2789899.9 [EPSG:32640]"},
                   context=context, feedback=QgsProcessingFeedback())
    _crs, transform, columns, rows = grid(out)
    assert transform == pytest.approx((320100.0, PIXEL, 0.0, 2789900.0, 0.0, -PIXEL))
    assert (columns, rows) == (128, 128)


def test_segment_with_explicit_bands(sample_raster, tmp_path, card_classes):
    out = tmp_path / "segmented.tif"
    run({"INPUT": str(sample_raster), "BANDS": [1, 2, 3], "EXTENT": SMALL, "DEVICE": 1, "OUTPUT": str(out)},
        alg="idgbr:segment")
    assert_on_sample_grid(out)
    assert class_values(out) <= {c["id"] for c in card_classes}


def test_layer_inside_an_archive_is_copied_first(sample_raster, tmp_path):
    """A /vsizip/ layer: the backend cannot open it, so it gets a temporary GeoTIFF on the same grid."""
    crop = tmp_path / "crop.tif"
    gdal.Translate(str(crop), str(sample_raster), srcWin=[200, 200, 96, 96])
    archive = tmp_path / "crop.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(crop, "crop.tif")
    layer = QgsRasterLayer(f"/vsizip/{archive}/crop.tif", "zipped", "gdal")
    assert layer.isValid()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    out = tmp_path / "from_zip.tif"
    import processing

    processing.run("idgbr:refine", {"INPUT": layer, "STEPS": 1, "OUTPUT": str(out)}, context=context,
                   feedback=QgsProcessingFeedback())
    assert grid(out) == grid(crop)


def test_web_tile_layer_is_copied_at_the_model_pixel_size(sample_raster, tmp_path):
    """An XYZ tile layer (local tiles, no network): rendered to a temporary GeoTIFF of the extent first."""
    import subprocess
    import sys

    tiles = tmp_path / "tiles"
    subprocess.run([sys.executable, "-m", "osgeo_utils.gdal2tiles", "-q", "-z", "18", "--xyz", "-w", "none",
                    "--processes=1", str(sample_raster), str(tiles)], check=True, timeout=120)
    url = (tiles.as_uri() + "/{z}/{x}/{y}.png").replace("{", "%7B").replace("}", "%7D")
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax=18", "tiles", "wms")
    assert layer.isValid()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    out = tmp_path / "from_tiles.tif"
    import processing

    processing.run("idgbr:refine", {"INPUT": layer, "EXTENT": SMALL, "STEPS": 1, "OUTPUT": str(out)},
                   context=context, feedback=QgsProcessingFeedback())
    crs, transform, columns, rows = grid(out)
    assert crs == "EPSG:3857"
    # 0.5 m on the ground is 0.5 / cos(latitude) Web Mercator units at Dubai (25.2° N).
    assert transform[1] == pytest.approx(0.5 / math.cos(math.radians(25.2)), rel=0.02)
    # The 64 m box, a little larger once reprojected: about 128 px and never much more.
    assert 125 <= columns <= 140 and 125 <= rows <= 140


class CancelOnProgress(QgsProcessingFeedback):
    """Cancels as soon as the backend reports that the job is under way."""

    def __init__(self) -> None:
        super().__init__()
        self.progressChanged.connect(self._check)

    def _check(self, percent: float) -> None:
        if percent > 0 and not self.isCanceled():
            self.cancel()


def test_cancel_leaves_no_output(sample_raster, tmp_path):
    out = tmp_path / "cancelled.tif"
    feedback = CancelOnProgress()
    with pytest.raises(QgsProcessingException, match="Cancelled"):
        run({"INPUT": str(sample_raster), "STEPS": 2, "OUTPUT": str(out)}, feedback)
    assert feedback.isCanceled()
    assert list(tmp_path.iterdir()) == []


def _constant_coarse(sample_labels: Path, tmp_path: Path, value: int) -> Path:
    """A class map on the sample's grid holding only ``value`` (no nodata)."""
    import numpy as np

    path = tmp_path / "bad_coarse.tif"
    dataset = gdal.Translate(str(path), str(sample_labels), noData="none")
    dataset.GetRasterBand(1).WriteArray(np.full((dataset.RasterYSize, dataset.RasterXSize), value, np.uint8))
    dataset = None
    return path


@pytest.mark.parametrize("params, message", [
    ({"BANDS": [1, 2, 7]}, r"Band 7 does not exist.*3 bands.*BANDS"),
    ({"BANDS": [1, 2]}, r"needs 3 bands.*BANDS"),
    ({"EXTENT": "0,10,0,10 [EPSG:32640]"}, r"does not overlap INPUT"),
    ({"EXTENT": "54.0,54.001,10.0,10.001 [EPSG:4326]"}, r"does not overlap INPUT"),
    ({"COARSE": "bad-ids"}, r"class ids 9.*outside this model's classes"),
    ({"MODEL": "not-a-bundle"}, r"not.*IDGBR model bundle|bundle"),
    ({"DEVICE": 1, "PRECISION": 4}, r"fp16 runs only on a CUDA GPU.*parameter PRECISION"),
])
def test_bad_inputs_are_explained(sample_raster, sample_labels, tmp_path, params, message):
    params = dict(params)
    if params.get("COARSE") == "bad-ids":
        params["COARSE"] = str(_constant_coarse(sample_labels, tmp_path, 9))
    if params.get("MODEL") == "not-a-bundle":
        fake = tmp_path / "fake.safetensors"
        fake.write_text("this is not a model")
        params["MODEL"] = str(fake)
    out = tmp_path / "out" / "never.tif"
    out.parent.mkdir()
    params = {"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "OUTPUT": str(out), **params}
    with pytest.raises(QgsProcessingException, match=message):
        run(params)
    assert list(out.parent.iterdir()) == []


class Warnings(QgsProcessingFeedback):
    def __init__(self) -> None:
        super().__init__()
        self.warnings: list[str] = []

    def pushWarning(self, text: str) -> None:  # noqa: N802 - Qt's name
        self.warnings.append(text)
        super().pushWarning(text)


def test_pixel_size_parameter_runs_at_the_model_resolution_and_writes_the_input_grid(sample_raster, tmp_path):
    """PIXEL_SIZE 0.05 on the 0.5 m sample: the backend takes the pixels for 5 cm ones, segments at
    dubai5's working 0.5 m, refines at 0.25 m and writes on the input's grid."""
    out = tmp_path / "refined.tif"
    feedback = Warnings()
    run({"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "PIXEL_SIZE": 0.05, "OUTPUT": str(out)}, feedback)
    assert_on_sample_grid(out)
    assert grid(out)[2:] == (128, 128)
    assert any("INPUT is 0.05 m per pixel; segmented at 0.5 m, refined at 0.25 m, written at 0.05 m" in w
               for w in feedback.warnings), feedback.warnings


def test_precision_parameter_reaches_the_backend(sample_raster, tmp_path):
    """PRECISION bf16: the run says which precision its networks used, and the map lands on the input grid."""
    out = tmp_path / "refined.tif"
    feedback = Warnings()
    run({"INPUT": str(sample_raster), "EXTENT": SMALL, "STEPS": 1, "DEVICE": 1, "PRECISION": 3, "OUTPUT": str(out)},
        feedback)
    assert_on_sample_grid(out)
    assert any("Precision: bf16 for the networks" in w for w in feedback.warnings), feedback.warnings
