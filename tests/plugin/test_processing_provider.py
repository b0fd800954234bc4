"""The provider and its algorithms as QGIS sees them: ids, parameters, help, flags, styling helpers, and the
copy of layers the backend cannot open. No backend service needed."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransformContext,
    QgsPalettedRasterRenderer,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsRasterLayer,
    QgsRectangle,
)

from idgbr_qgis.jobs import inputs
from idgbr_qgis.jobs.outcome import JobError
from idgbr_qgis.styling import apply_class_style, categorized_renderer, class_data

REFINE_PARAMETERS = ["INPUT", "BANDS", "COARSE", "MODEL", "EXTENT", "STEPS", "BAND", "VOCABULARY", "MIN_CONFIDENCE",
                     "PIXEL_SIZE", "DEVICE", "PRECISION", "OUTPUT", "CONFIDENCE", "OUTPUT_POLYGONS"]
CLASSES = [{"id": 0, "name": "water", "color": "#E2A929"}, {"id": 2, "name": "road", "color": "#6EC1E4"},
           {"id": 1, "name": "land", "color": "#8429F6"}]


def test_provider_lists_both_algorithms(idgbr_provider):
    registry = QgsApplication.processingRegistry()
    provider = registry.providerById("idgbr")
    assert provider.name() == "IDGBR"
    assert not provider.icon().isNull()
    assert {a.id() for a in provider.algorithms()} == {"idgbr:refine", "idgbr:segment"}
    assert provider.supportedOutputRasterLayerExtensions() == ["tif"]


def test_refine_parameters_help_and_flags(idgbr_provider):
    alg = QgsApplication.processingRegistry().algorithmById("idgbr:refine")
    assert alg.displayName() == "IDGBR Refine"
    assert [p.name() for p in alg.parameterDefinitions()] == REFINE_PARAMETERS
    for parameter in alg.parameterDefinitions():
        assert parameter.help(), f"{parameter.name()} has no help text"
    optional = {p.name() for p in alg.parameterDefinitions() if p.flags() & p.FlagOptional}
    assert optional == {"BANDS", "COARSE", "MODEL", "EXTENT", "STEPS", "BAND", "VOCABULARY", "MIN_CONFIDENCE",
                        "PIXEL_SIZE", "PRECISION", "CONFIDENCE", "OUTPUT_POLYGONS"}
    advanced = {p.name() for p in alg.parameterDefinitions() if p.flags() & p.FlagAdvanced}
    assert {"BAND", "VOCABULARY", "MIN_CONFIDENCE", "PIXEL_SIZE", "DEVICE", "PRECISION"} <= advanced
    pixel = alg.parameterDefinition("PIXEL_SIZE")  # metres per input pixel; 0 = from the layer's CRS
    assert (pixel.minimum(), pixel.defaultValue(), pixel.dataType()) == (0.0, 0.0, pixel.Double)
    for name in ("BAND", "VOCABULARY"):
        rule = alg.parameterDefinition(name)
        assert (rule.minimum(), rule.maximum(), rule.dataType()) == (-1, 1024, rule.Integer)
    gate = alg.parameterDefinition("MIN_CONFIDENCE")
    assert (gate.minimum(), gate.maximum(), gate.dataType()) == (0.0, 1.0, gate.Double)
    assert not alg.parameterDefinition("CONFIDENCE").createByDefault()
    assert alg.parameterDefinition("DEVICE").options() == ["auto", "cpu", "cuda", "mps"]
    precision = alg.parameterDefinition("PRECISION")  # the device's default first, so old scripts keep theirs
    assert precision.defaultValue() == 0 and len(precision.options()) == 5
    assert alg.parameterDefinition("BANDS").allowMultiple()
    # Runs in the Processing worker thread, cancellable, usable in batch mode.
    assert not alg.flags() & QgsProcessingAlgorithm.FlagNoThreading
    assert alg.flags() & QgsProcessingAlgorithm.FlagCanCancel
    assert alg.flags() & QgsProcessingAlgorithm.FlagSupportsBatch
    assert "boundar" in alg.shortHelpString()
    assert alg.group() and not alg.icon().isNull()
    assert {o.name() for o in alg.outputDefinitions()} == {"OUTPUT", "CONFIDENCE", "OUTPUT_POLYGONS"}


def test_segment_has_no_refiner_parameters(idgbr_provider):
    alg = QgsApplication.processingRegistry().algorithmById("idgbr:segment")
    names = [p.name() for p in alg.parameterDefinitions()]
    assert names == ["INPUT", "BANDS", "MODEL", "EXTENT", "PIXEL_SIZE", "DEVICE", "PRECISION", "OUTPUT",
                     "OUTPUT_POLYGONS"]


def test_output_must_be_geotiff(idgbr_provider, sample_raster, tmp_path):
    import processing

    with pytest.raises(QgsProcessingException, match=r"GeoTIFF.*\.tif"):
        processing.run("idgbr:refine", {"INPUT": str(sample_raster), "OUTPUT": str(tmp_path / "out.png")})
    assert not (tmp_path / "out.png").exists()


def test_missing_backend_is_explained(idgbr_provider, sample_raster, tmp_path):
    """Without a backend interpreter the run fails with the way to set one up, and writes nothing."""
    import processing

    from idgbr_qgis.backend_process import BackendManager, BackendUnavailable

    def locate():
        raise BackendUnavailable("No IDGBR backend is installed yet. Open Plugins ▸ IDGBR ▸ Settings…")

    previous = BackendManager.set_instance(BackendManager(locate=locate))
    try:
        with pytest.raises(QgsProcessingException, match="backend is not available.*Settings"):
            processing.run("idgbr:refine", {"INPUT": str(sample_raster), "OUTPUT": str(tmp_path / "o.tif")})
    finally:
        BackendManager.set_instance(previous)
    assert not (tmp_path / "o.tif").exists()


def test_explicit_python_setting_that_does_not_exist(monkeypatch, tmp_path):
    from qgis.core import QgsSettings

    from idgbr_qgis import backend_process

    monkeypatch.delenv(backend_process.ENV_PYTHON, raising=False)
    settings = QgsSettings()
    old = settings.value(backend_process.SETTINGS_PYTHON)
    settings.setValue(backend_process.SETTINGS_PYTHON, str(tmp_path / "nowhere" / "python"))
    try:
        with pytest.raises(backend_process.BackendUnavailable, match="does not exist.*Settings"):
            backend_process.find_python()
        # IDGBR_PYTHON, set for one process, wins over the setting.
        monkeypatch.setenv(backend_process.ENV_PYTHON, sys.executable)
        path, source = backend_process.find_python()
        assert path == Path(sys.executable) and backend_process.ENV_PYTHON in source
    finally:
        if old is None:
            settings.remove(backend_process.SETTINGS_PYTHON)
        else:
            settings.setValue(backend_process.SETTINGS_PYTHON, old)


def test_python_candidates_order(monkeypatch):
    from idgbr_qgis import backend_process

    monkeypatch.setenv(backend_process.ENV_PYTHON, "/somewhere/python")
    sources_ = [source for source, _path, _explicit in backend_process.python_candidates()]
    assert backend_process.ENV_PYTHON in sources_[0]
    assert "checkout" in sources_[-2] and "first-run setup" in sources_[-1]
    assert backend_process.python_candidates()[-1][1].parent.parent == backend_process.profile_venv()


# ----------------------------------------------------------------------------------------------------- styling


def test_paletted_renderer_from_card_classes(sample_labels, load_raster):
    layer = load_raster(sample_labels, "labels")
    apply_class_style(layer, CLASSES)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer)
    assert [(c.value, c.label, c.color.name().upper()) for c in renderer.classes()] == [
        (0, "water", "#E2A929"), (1, "land", "#8429F6"), (2, "road", "#6EC1E4")]


@pytest.mark.parametrize("bad, message", [
    ([], "empty"),
    ([{"id": 0, "name": "a"}], "needs an integer 'id'"),
    ([{"id": 0, "name": "a", "color": "not-a-colour"}], "invalid colour"),
    ([{"id": 0, "name": "a", "color": "#000000"}, {"id": 0, "name": "b", "color": "#FFFFFF"}], "twice"),
])
def test_bad_class_tables_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        class_data(bad)


def test_confidence_style_is_a_0_to_1_ramp_from_red_to_clear(tmp_path, load_raster):
    import numpy as np
    from osgeo import gdal
    from qgis.core import QgsColorRampShader, QgsSingleBandPseudoColorRenderer

    from idgbr_qgis.styling import apply_confidence_style

    path = tmp_path / "confidence.tif"
    dataset = gdal.GetDriverByName("GTiff").Create(str(path), 8, 8, 1, gdal.GDT_Float32)
    dataset.GetRasterBand(1).WriteArray(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    dataset.GetRasterBand(1).SetNoDataValue(-1)
    dataset = None
    layer = load_raster(path, "confidence")
    apply_confidence_style(layer)
    renderer = layer.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    assert (renderer.classificationMin(), renderer.classificationMax()) == (0.0, 1.0)
    ramp = renderer.shader().rasterShaderFunction()
    assert ramp.colorRampType() == QgsColorRampShader.Interpolated
    items = ramp.colorRampItemList()
    assert [item.value for item in items] == [0.0, 0.5, 0.8, 1.0]
    unsure, sure = items[0].color, items[-1].color
    assert unsure.red() > 200 and unsure.green() < 50 and unsure.alpha() > 200  # red, opaque
    assert sure.alpha() == 0  # clear where the refiner is sure


def test_categorized_polygon_style():
    renderer = categorized_renderer(CLASSES)
    assert renderer.classAttribute() == "class_id"
    assert [c.label() for c in renderer.categories()] == ["water", "land", "road"]


# ----------------------------------------------------------------------------------- layers the backend can't open


def test_plain_file_passes_through(sample_raster, load_raster):
    assert inputs.plain_file(load_raster(sample_raster)) == sample_raster


def test_zipped_layer_is_copied_on_its_own_grid(sample_raster, tmp_path, load_raster):
    archive = tmp_path / "sample.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(sample_raster, "inner.tif")
    layer = load_raster(f"/vsizip/{archive}/inner.tif", "zipped")
    assert inputs.plain_file(layer) is None
    source = inputs.describe(layer)
    # A window that does not fall on pixel edges: the copy snaps outwards to the layer's own grid.
    wanted = QgsRectangle(320010.2, 2789890.3, 320050.1, 2789950.9)
    copy = inputs.export(source, tmp_path / "copy.tif", wanted, 0.5, QgsCoordinateTransformContext())
    copied = load_raster(copy, "copy")
    assert copied.crs().authid() == "EPSG:32640"
    assert copied.bandCount() == 3
    assert copied.rasterUnitsPerPixelX() == pytest.approx(0.5)
    extent = copied.extent()
    assert (extent.xMinimum(), extent.yMaximum()) == pytest.approx((320010.0, 2789951.0))
    assert (copied.width(), copied.height()) == (81, 122)
    # Pixel values are copied, not resampled: the same block as the original at the same place.
    original = load_raster(sample_raster, "original")
    a = original.dataProvider().block(2, extent, copied.width(), copied.height())
    b = copied.dataProvider().block(2, extent, copied.width(), copied.height())
    assert bytes(a.data()) == bytes(b.data())


def test_copy_of_extent_outside_layer_names_the_problem(sample_raster, tmp_path, load_raster):
    archive = tmp_path / "s.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(sample_raster, "inner.tif")
    source = inputs.describe(load_raster(f"/vsizip/{archive}/inner.tif"))
    with pytest.raises(JobError, match="does not overlap the layer"):
        inputs.export(source, tmp_path / "c.tif", QgsRectangle(0, 0, 10, 10), 0.5, QgsCoordinateTransformContext())
    assert not (tmp_path / "c.tif").exists()


def test_web_layer_window_uses_ground_pixel_size():
    """A tile layer has no pixel grid: its copy samples the extent at the model's size in metres."""
    mercator = QgsCoordinateReferenceSystem("EPSG:3857")
    source = inputs.RasterSource(name="tiles", crs=mercator, extent=QgsRectangle(-2e7, -2e7, 2e7, 2e7),
                                  width=0, height=0)
    # ~100 m box near Dubai (25.2° N): Web Mercator metres are 1/cos(lat) larger than ground metres.
    box = QgsRectangle(6_130_000, 2_900_000, 6_130_110.6, 2_900_110.6)
    rect, columns, rows = inputs.web_window(source, box, 0.5, QgsCoordinateTransformContext())
    assert rect == box
    assert columns == pytest.approx(200, abs=3) and rows == pytest.approx(200, abs=3)
    with pytest.raises(JobError, match="set EXTENT"):
        inputs.web_window(source, None, 0.5, QgsCoordinateTransformContext())
    with pytest.raises(JobError, match="smaller EXTENT"):
        inputs.web_window(source, QgsRectangle(6e6, 2e6, 6.2e6, 2.2e6), 0.5, QgsCoordinateTransformContext())


def test_layer_with_crs_set_in_qgis_is_copied(tmp_path, sample_raster, load_raster):
    """A file without a CRS, given one inside QGIS: the backend must get a copy that carries it."""
    from osgeo import gdal

    bare = tmp_path / "bare.tif"
    memory = gdal.Translate("", str(sample_raster), format="MEM", srcWin=[0, 0, 64, 64])
    memory.SetProjection("")
    gdal.GetDriverByName("GTiff").CreateCopy(str(bare), memory)
    memory = None
    layer = QgsRasterLayer(str(bare), "bare", "gdal")
    assert layer.isValid()
    layer.setCrs(QgsCoordinateReferenceSystem("EPSG:32640"))
    assert inputs.plain_file(layer) is None
    copy = inputs.export(inputs.describe(layer), tmp_path / "with_crs.tif", None, 0.5,
                          QgsCoordinateTransformContext())
    assert load_raster(copy).crs().authid() == "EPSG:32640"
