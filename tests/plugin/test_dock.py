"""The dock end to end against a real backend service: draw, run, cancel, backend death, CRS cases."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsSettings,
)
from qgis.PyQt.QtCore import QPoint, Qt
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QApplication

from idgbr_qgis.backend_process import BackendManager, BackendUnavailable
from idgbr_qgis.ui import config
from idgbr_qgis.ui.dock import IdgbrDock

# The sample: 1000 × 1000 px, EPSG:32640, 0.5 m pixels, upper-left corner (320000, 2790000).
X0, Y0, PIXEL = 320000.0, 2790000.0, 0.5
LAYER_CRS = "EPSG:32640"
KEYS = (config.KEY_DEVICE, config.KEY_MODEL, config.KEY_STEPS, config.KEY_BAND, config.KEY_VOCABULARY,
        config.KEY_MIN_CONFIDENCE, config.KEY_SHOW_CONFIDENCE, config.KEY_SHOW_CHANGES, config.KEY_OUTPUT_DIR)
# The result layers' names: after the input and the model.
REFINED, COARSE, CONFIDENCE, CHANGES = (f"{{}} — {what} (dubai5)" for what in
                                        ("refined", "coarse", "confidence", "changed pixels"))


@pytest.fixture
def dock_settings(tmp_path):
    """Few steps and a private results folder for the test; the developer's settings come back after."""
    settings = QgsSettings()
    saved = {key: settings.value(key, None) for key in KEYS}
    results = tmp_path / "results"
    config.UserSettings(device="cpu", model="dubai5", steps=2, output_dir=str(results)).save()
    yield results
    for key, value in saved.items():
        if value is None:
            settings.remove(key)
        else:
            settings.setValue(key, value)


@pytest.fixture
def project(qgis_iface, qgis_canvas, qgis_parent):
    QgsProject.instance().clear()
    # The canvas lives in pytest-qgis's main window: only a shown window gives its viewport a real size.
    qgis_parent.resize(800, 600)
    qgis_parent.show()
    qgis_canvas.resize(600, 400)
    qgis_canvas.show()
    yield QgsProject.instance()
    QgsProject.instance().clear()
    qgis_iface.messageBar().clear_messages()


def make_dock(iface, manager) -> IdgbrDock:
    dock = IdgbrDock(iface, manager)
    dock._health_requested = True  # no automatic backend check: each test decides what runs
    return dock


@pytest.fixture
def dock(qgis_iface, idgbr_backend, project, dock_settings):
    widget = make_dock(qgis_iface, idgbr_backend)
    yield widget
    if widget.is_running():
        widget.cancel()
        wait_for(lambda: not widget.is_running(), 60)
    widget.shutdown()
    widget.deleteLater()


def wait_for(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        QApplication.processEvents()
        time.sleep(0.01)


def run_and_wait(dock: IdgbrDock, timeout: float = 180) -> tuple[bool, str]:
    results: list[tuple[bool, str]] = []
    dock.runFinished.connect(lambda ok, msg: results.append((ok, msg)))
    task = dock.run()
    assert task is not None, _messages()
    wait_for(lambda: bool(results), timeout)
    return results[-1]


def _messages() -> str:
    from qgis.utils import iface

    bar = iface.messageBar()
    return str({level: bar.get_messages(level) for level in (Qgis.Info, Qgis.Warning, Qgis.Critical)})


def add_sample(path: Path, name: str = "dubai") -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    return layer


def set_canvas(canvas, crs: str, extent: QgsRectangle) -> None:
    # Let QGIS's zoom-to-first-layer happen first, or it would replace the extent set here.
    QApplication.processEvents()
    QgsProject.instance().setCrs(QgsCoordinateReferenceSystem(crs))
    canvas.setDestinationCrs(QgsCoordinateReferenceSystem(crs))
    canvas.setExtent(extent)
    canvas.refresh()
    QApplication.processEvents()
    shown = canvas.extent()
    assert shown.contains(extent.center()), (shown.toString(1), extent.toString(1))


def snapped(rect: QgsRectangle) -> QgsRectangle:
    """`rect` (layer CRS) snapped outward to the sample's pixel grid and clipped to it: what the backend does."""
    eps = 1e-6
    c0 = max(0, math.floor((rect.xMinimum() - X0) / PIXEL + eps))
    c1 = min(1000, math.ceil((rect.xMaximum() - X0) / PIXEL - eps))
    r0 = max(0, math.floor((Y0 - rect.yMaximum()) / PIXEL + eps))
    r1 = min(1000, math.ceil((Y0 - rect.yMinimum()) / PIXEL - eps))
    return QgsRectangle(X0 + c0 * PIXEL, Y0 - r1 * PIXEL, X0 + c1 * PIXEL, Y0 - r0 * PIXEL)


def result_group(layer_name: str):
    group = QgsProject.instance().layerTreeRoot().findGroup(f"{layer_name} — IDGBR")
    assert group is not None, [c.name() for c in QgsProject.instance().layerTreeRoot().children()]
    return group


def assert_on_grid(layer: QgsRasterLayer, expected: QgsRectangle) -> None:
    got = layer.extent()
    for a, b in ((got.xMinimum(), expected.xMinimum()), (got.xMaximum(), expected.xMaximum()),
                 (got.yMinimum(), expected.yMinimum()), (got.yMaximum(), expected.yMaximum())):
        assert a == pytest.approx(b, abs=1e-6), (got.toString(3), expected.toString(3))
    assert layer.rasterUnitsPerPixelX() == pytest.approx(PIXEL)


# ------------------------------------------------------------------------------------------------- runs


def test_drawn_extent_runs_in_a_task_and_adds_the_styled_layers(dock, qgis_canvas, sample_raster, dock_settings):
    layer = add_sample(sample_raster)
    dock.layerCombo.setLayer(layer)
    # 600 × 400 canvas pixels over 300 × 200 m: 0.5 m (one raster pixel) per screen pixel.
    set_canvas(qgis_canvas, LAYER_CRS, QgsRectangle(X0 + 100, Y0 - 300, X0 + 400, Y0 - 100))
    dock.start_drawing()
    assert qgis_canvas.mapTool() is dock.tool
    viewport = qgis_canvas.viewport()
    QTest.mousePress(viewport, Qt.LeftButton, Qt.NoModifier, QPoint(100, 100))
    QTest.mouseMove(viewport, QPoint(180, 150))
    QTest.mouseMove(viewport, QPoint(227, 201))
    QTest.mouseRelease(viewport, Qt.LeftButton, Qt.NoModifier, QPoint(227, 201))
    drawn = dock.tool.extent()
    assert drawn is not None and drawn.width() > 50
    assert "px" in dock.extentLabel.text()

    results: list[tuple[bool, str]] = []
    dock.runFinished.connect(lambda ok, msg: results.append((ok, msg)))
    task = dock.run()
    assert task is not None, _messages()
    # It is a QgsTask in QGIS's task manager, and the panel stays usable meanwhile.
    assert task in QgsApplication.taskManager().tasks()
    assert dock.cancelButton.isEnabled() and not dock.runButton.isEnabled()
    progress: list[float] = []
    task.progressChanged.connect(progress.append)
    wait_for(lambda: bool(results), 180)
    ok, message = results[-1]
    assert ok, message
    assert progress and max(progress) == 100 and dock.progressBar.value() == 100

    group = result_group("dubai")
    names = [node.name() for node in group.findLayers()]
    assert names == [REFINED.format("dubai"), COARSE.format("dubai")]
    refined_node, coarse_node = group.findLayers()
    assert refined_node.isVisible() and not coarse_node.isVisible()
    refined = refined_node.layer()
    assert refined.crs().authid() == LAYER_CRS
    assert_on_grid(refined, snapped(drawn))
    assert_on_grid(coarse_node.layer(), snapped(drawn))
    renderer = refined.renderer()
    assert isinstance(renderer, QgsPalettedRasterRenderer)
    card = config.read_model_card(config.bundled_models()["dubai5"])
    assert [c.label for c in renderer.classes()] == [c["name"] for c in card["classes"]]
    assert Path(refined.source()).parent == dock_settings
    assert dock.runButton.isEnabled() and not dock.cancelButton.isEnabled()


@pytest.mark.parametrize("project_crs", ["EPSG:3857", "EPSG:4326"])
def test_project_crs_different_from_the_layer(dock, qgis_canvas, sample_raster, project_crs):
    layer = add_sample(sample_raster)
    dock.layerCombo.setLayer(layer)
    to_project = QgsCoordinateTransform(QgsCoordinateReferenceSystem(LAYER_CRS),
                                        QgsCoordinateReferenceSystem(project_crs), QgsProject.instance())
    set_canvas(qgis_canvas, project_crs, to_project.transformBoundingBox(layer.extent()))
    # An extent drawn in the project's CRS, over the middle of the layer.
    wanted = QgsRectangle(X0 + 200.3, Y0 - 290.1, X0 + 251.7, Y0 - 230.6)
    drawn = to_project.transformBoundingBox(wanted)
    dock.set_drawn_extent(drawn)
    ok, message = run_and_wait(dock)
    assert ok, message
    refined = result_group("dubai").findLayers()[0].layer()
    assert refined.crs().authid() == LAYER_CRS  # the input's grid and CRS, not the project's
    back = to_project.transformBoundingBox(drawn, Qgis.TransformDirection.Reverse)
    got = refined.extent()
    # Snapped outward: covers the drawn area, at most one pixel (plus reprojection slack) beyond it.
    assert got.xMinimum() <= back.xMinimum() + 1e-6 and got.yMaximum() >= back.yMaximum() - 1e-6
    assert got.xMaximum() >= back.xMaximum() - 1e-6 and got.yMinimum() <= back.yMinimum() + 1e-6
    assert got.width() <= back.width() + 3 * PIXEL and got.height() <= back.height() + 3 * PIXEL
    for value, origin in ((got.xMinimum(), X0), (got.yMaximum(), Y0)):
        offset = (value - origin) / PIXEL
        assert offset == pytest.approx(round(offset), abs=1e-6)


def test_layer_without_crs(dock, qgis_canvas, sample_raster, tmp_path):
    from osgeo import gdal

    path = tmp_path / "no_crs.tif"
    gdal.Translate(str(path), str(sample_raster), srcWin=[0, 0, 200, 200])
    handle = gdal.Open(str(path), gdal.GA_Update)
    handle.SetProjection("")
    handle = None
    layer = add_sample(path, "nocrs")
    assert not layer.crs().isValid()
    dock.layerCombo.setLayer(layer)
    set_canvas(qgis_canvas, LAYER_CRS, QgsRectangle(X0, Y0 - 100, X0 + 100, Y0))
    wanted = QgsRectangle(X0 + 10.2, Y0 - 60.4, X0 + 50.1, Y0 - 20.3)
    dock.set_drawn_extent(wanted)
    ok, message = run_and_wait(dock)
    assert ok, message
    refined = result_group("nocrs").findLayers()[0].layer()
    assert not refined.crs().isValid()
    assert_on_grid(refined, snapped(wanted))


def test_whole_layer_and_an_existing_class_layer_as_coarse_map(dock, sample_raster, sample_labels, tmp_path):
    from osgeo import gdal

    small = tmp_path / "small.tif"
    labels = tmp_path / "small_labels.tif"
    gdal.Translate(str(small), str(sample_raster), srcWin=[500, 500, 160, 120])
    gdal.Translate(str(labels), str(sample_labels), srcWin=[500, 500, 160, 120])
    layer = add_sample(small, "small")
    classes = add_sample(labels, "labels")
    dock.layerCombo.setLayer(layer)
    dock.coarseSourceCombo.setCurrentIndex(dock.coarseSourceCombo.findData("layer"))
    dock.coarseLayerCombo.setLayer(classes)
    dock.set_extent_mode("layer")
    ok, message = run_and_wait(dock)
    assert ok, message
    refined_node, coarse_node = result_group("small").findLayers()
    assert refined_node.layer().width() == 160 and refined_node.layer().height() == 120
    assert coarse_node.layer().source() == classes.source() and not coarse_node.isVisible()


def test_coarse_layer_in_another_crs_that_must_be_copied_covers_a_drawn_extent(dock, idgbr_backend, qgis_iface,
                                                                              qgis_canvas, sample_raster,
                                                                              sample_labels, tmp_path):
    """A class layer the backend cannot open (zipped) in Web Mercator, the image in UTM, an extent drawn on a
    WGS 84 map: the coarse copy is cut in its own CRS around the extent, so the refined map covers the extent
    and equals a run on the same class map given as a plain file."""
    import zipfile

    import numpy as np
    from osgeo import gdal

    mercator = tmp_path / "labels_3857.tif"
    gdal.Warp(str(mercator), str(sample_labels), dstSRS="EPSG:3857", xRes=1.0, yRes=1.0, resampleAlg="near")
    archive = tmp_path / "labels.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(mercator, "labels_3857.tif")
    layer = add_sample(sample_raster)
    classes = add_sample(f"/vsizip/{archive}/labels_3857.tif", "zipped labels")
    assert classes.crs().authid() == "EPSG:3857"
    dock.layerCombo.setLayer(layer)
    dock.coarseSourceCombo.setCurrentIndex(dock.coarseSourceCombo.findData("layer"))
    dock.coarseLayerCombo.setLayer(classes)
    dock.bandSpin.setValue(0)  # band 0: the refined map is the coarse map on the input's grid, nothing else
    dock.vocabularySpin.setValue(config.RULE_OFF)
    wanted = QgsRectangle(X0 + 200.3, Y0 - 290.1, X0 + 251.7, Y0 - 230.6)
    to_wgs84 = QgsCoordinateTransform(QgsCoordinateReferenceSystem(LAYER_CRS),
                                      QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance())
    set_canvas(qgis_canvas, "EPSG:4326", to_wgs84.transformBoundingBox(layer.extent()))
    drawn = to_wgs84.transformBoundingBox(wanted)
    dock.set_drawn_extent(drawn)
    qgis_iface.messageBar().clear_messages()
    ok, message = run_and_wait(dock)
    assert ok, message
    notes = qgis_iface.messageBar().get_messages(Qgis.Info)
    assert not any("covers only part" in note for note in notes), notes

    refined = result_group("dubai").findLayers()[0].layer()
    back = to_wgs84.transformBoundingBox(drawn, Qgis.TransformDirection.Reverse)
    got = refined.extent()
    assert got.contains(back) and refined.crs().authid() == LAYER_CRS

    reference = tmp_path / "reference.tif"
    client = idgbr_backend.client()
    job = client.submit(input=str(sample_raster), output=str(reference), coarse=str(mercator), mode="refine",
                        extent=[drawn.xMinimum(), drawn.yMinimum(), drawn.xMaximum(), drawn.yMaximum()],
                        extent_crs="EPSG:4326", steps=2, band=0, vocabulary=-1, device="cpu")
    client.wait(job, poll=0.1)

    def ids(path):
        dataset = gdal.Open(str(path))
        try:
            return dataset.GetGeoTransform(), dataset.GetRasterBand(1).ReadAsArray()
        finally:
            dataset = None

    (grid, values), (reference_grid, reference_values) = ids(refined.source()), ids(reference)
    assert grid == pytest.approx(reference_grid)
    assert np.array_equal(values, reference_values)
    assert (values != 255).mean() > 0.99, "the coarse map covered the whole extent"


def test_image_is_preselected_over_an_active_class_raster(qgis_iface, project, dock_settings, sample_raster,
                                                         sample_labels):
    """A class raster as the active layer is offered as the class layer, not as the image to refine."""
    manager = BackendManager(locate=lambda: (_ for _ in ()).throw(BackendUnavailable("none")))
    labels = add_sample(sample_labels, "labels")
    image = add_sample(sample_raster, "image")
    qgis_iface.setActiveLayer(labels)
    widget = make_dock(qgis_iface, manager)
    try:
        assert widget.layerCombo.currentLayer() is image
        assert widget.coarseLayerCombo.currentLayer() is labels
        # A raster added later does not replace the image already chosen.
        add_sample(sample_raster, "later")
        assert widget.layerCombo.currentLayer() is image
    finally:
        widget.shutdown()
        widget.deleteLater()


def test_single_band_image_needs_the_band_mapping(dock, sample_raster, tmp_path):
    """One band: the failure points at 'Band mapping'; mapping band 1 to red, green and blue then runs."""
    from osgeo import gdal

    grey = tmp_path / "grey.tif"
    gdal.Translate(str(grey), str(sample_raster), srcWin=[400, 400, 64, 64], bandList=[2])
    dock.layerCombo.setLayer(add_sample(grey, "grey"))
    dock.set_extent_mode("layer")
    assert dock.band_mapping() is None
    ok, message = run_and_wait(dock)
    assert not ok and "has 1 band" in message and "Band mapping" in message
    dock.set_band_mapping([1, 1, 1])
    assert dock.band_mapping() == [1, 1, 1]
    ok, message = run_and_wait(dock)
    assert ok, message
    refined = result_group("grey").findLayers()[0].layer()
    assert (refined.width(), refined.height()) == (64, 64)


# ---------------------------------------------------------------------------------------- interruptions


def _start_long_run(dock, sample_raster) -> None:
    layer = add_sample(sample_raster)
    dock.layerCombo.setLayer(layer)
    dock.set_extent_mode("layer")
    dock.stepsSpin.setValue(20)  # long enough to interrupt in the middle


def _result_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tif*")) if folder.exists() else []


def test_cancel_mid_run_adds_nothing_and_leaves_no_file(dock, sample_raster, dock_settings):
    _start_long_run(dock, sample_raster)
    results: list[tuple[bool, str]] = []
    dock.runFinished.connect(lambda ok, msg: results.append((ok, msg)))
    task = dock.run()
    assert task is not None, _messages()
    wait_for(lambda: task.progress() > 27 or bool(results), 120)  # in the refiner
    assert not results, results
    dock.cancelButton.click()
    assert dock.statusLabel.text() == "Cancelling…"
    wait_for(lambda: bool(results), 300)  # the engine stops at its next batch
    ok, message = results[-1]
    assert not ok and "Cancelled" in message
    assert QgsProject.instance().layerTreeRoot().findGroup("dubai — IDGBR") is None
    assert len(QgsProject.instance().mapLayers()) == 1
    assert _result_files(dock_settings) == []
    assert dock.runButton.isEnabled()


def test_backend_killed_mid_run_reports_and_next_run_restarts_it(dock, idgbr_backend, sample_raster,
                                                                 dock_settings, qgis_iface):
    _start_long_run(dock, sample_raster)
    results: list[tuple[bool, str]] = []
    dock.runFinished.connect(lambda ok, msg: results.append((ok, msg)))
    task = dock.run()
    assert task is not None, _messages()
    wait_for(lambda: task.progress() > 27 or bool(results), 120)  # in the refiner
    assert not results, results
    pid = idgbr_backend.client().pid
    assert pid
    os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    wait_for(lambda: bool(results), 120)
    ok, message = results[-1]
    assert not ok
    assert "backend" in message and "next run" in message.lower()
    assert any("backend" in m for m in qgis_iface.messageBar().get_messages(Qgis.Critical))
    assert QgsProject.instance().layerTreeRoot().findGroup("dubai — IDGBR") is None
    assert _result_files(dock_settings) == []
    # The next run starts a fresh service and succeeds.
    dock.stepsSpin.setValue(2)
    dock.set_drawn_extent(QgsRectangle(X0 + 10, Y0 - 40, X0 + 40, Y0 - 10), QgsCoordinateReferenceSystem(LAYER_CRS))
    ok, message = run_and_wait(dock)
    assert ok, message
    assert idgbr_backend.client().pid != pid


def test_plugin_unload_during_a_run_adds_nothing(qgis_iface, idgbr_backend, project, dock_settings, sample_raster):
    widget = make_dock(qgis_iface, idgbr_backend)
    _start_long_run(widget, sample_raster)
    task = widget.run()
    assert task is not None, _messages()
    wait_for(lambda: task.progress() > 6, 120)
    widget.shutdown()  # what the plugin's unload does, before deleting the dock
    widget.deleteLater()
    manager = QgsApplication.taskManager()
    wait_for(lambda: manager.countActiveTasks() == 0, 300)
    QApplication.processEvents()
    assert QgsProject.instance().layerTreeRoot().findGroup("dubai — IDGBR") is None
    assert _result_files(dock_settings) == []


# ------------------------------------------------------------------------------------------ bad choices


def test_run_without_a_drawn_extent_says_how(dock, sample_raster, qgis_iface):
    dock.layerCombo.setLayer(add_sample(sample_raster))
    dock.set_extent_mode("drawn")
    assert dock.run() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any("Draw" in w for w in warnings), warnings


def test_extent_outside_the_layer_is_refused(dock, qgis_canvas, sample_raster, qgis_iface):
    dock.layerCombo.setLayer(add_sample(sample_raster))
    set_canvas(qgis_canvas, LAYER_CRS, QgsRectangle(X0, Y0 - 500, X0 + 500, Y0))
    dock.set_drawn_extent(QgsRectangle(X0 + 5000, Y0 + 5000, X0 + 5100, Y0 + 5100))
    assert dock.run() is None
    warnings = qgis_iface.messageBar().get_messages(Qgis.Warning)
    assert any("does not overlap" in w for w in warnings), warnings


def test_no_backend_installed_offers_the_setup(qgis_iface, project, dock_settings, sample_raster):
    def nowhere():
        raise BackendUnavailable("No IDGBR backend is installed yet. Open Plugins ▸ IDGBR ▸ Settings…")

    widget = make_dock(qgis_iface, BackendManager(locate=nowhere))
    try:
        widget.layerCombo.setLayer(add_sample(sample_raster))
        widget.set_drawn_extent(QgsRectangle(X0 + 10, Y0 - 40, X0 + 40, Y0 - 10),
                                QgsCoordinateReferenceSystem(LAYER_CRS))
        ok, message = run_and_wait(widget, 60)
        assert not ok and "Settings" in message
        assert not widget.setupButton.isHidden()
        assert QgsProject.instance().layerTreeRoot().findGroup("dubai — IDGBR") is None
        assert widget.runButton.isEnabled()
    finally:
        widget.shutdown()
        widget.deleteLater()


def test_backend_that_cannot_start_is_reported_with_the_fix(qgis_iface, project, dock_settings, sample_raster,
                                                            tmp_path):
    import venv

    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)  # a Python without torch or the backend
    python = bare / ("Scripts/python.exe" if sys.platform.startswith("win") else "bin/python")
    widget = make_dock(qgis_iface, BackendManager(state_dir=tmp_path / "state", locate=lambda: (python, "test")))
    try:
        widget.layerCombo.setLayer(add_sample(sample_raster))
        widget.set_extent_mode("view")
        ok, message = run_and_wait(widget, 120)
        assert not ok and "could not start" in message
        assert "set up the backend" in message.lower() or "setup" in message.lower()
        assert not widget.setupButton.isHidden()
        assert QgsProject.instance().layerTreeRoot().findGroup("dubai — IDGBR") is None
        assert list(dock_settings.glob("*.tif")) == []
    finally:
        widget.shutdown()
        widget.deleteLater()


def test_after_a_failed_setup_the_dock_offers_the_setup_again(qgis_iface, project, tmp_path, monkeypatch):
    """A half-built environment (no completion marker) is no backend: the panel offers the setup, and its
    message names the button, not a developer command."""
    import venv

    from idgbr_qgis import backend_process

    profile_venv = tmp_path / "profile" / "idgbr" / "venv"
    venv.EnvBuilder(with_pip=False).create(profile_venv)  # what a setup that failed after its first step leaves
    monkeypatch.setattr(backend_process, "profile_venv", lambda: profile_venv)
    monkeypatch.setattr(backend_process, "dev_checkout_venv", lambda: tmp_path / "no-checkout")
    monkeypatch.delenv(backend_process.ENV_PYTHON, raising=False)
    settings = QgsSettings()
    saved = settings.value(backend_process.SETTINGS_PYTHON, None)
    settings.remove(backend_process.SETTINGS_PYTHON)
    widget = make_dock(qgis_iface, BackendManager(state_dir=tmp_path / "state"))
    try:
        widget.check_backend()
        wait_for(lambda: widget._health_task is None, 120)
        message = widget.deviceLabel.toolTip()
        assert widget.deviceLabel.text() == "Device: backend unavailable"
        assert not widget.setupButton.isHidden()
        assert "Set up backend" in message and "make install" not in message
    finally:
        widget.shutdown()
        widget.deleteLater()
        if saved is not None:
            settings.setValue(backend_process.SETTINGS_PYTHON, saved)


def test_settings_persist_between_docks(qgis_iface, project, dock_settings):
    manager = BackendManager(locate=lambda: (_ for _ in ()).throw(BackendUnavailable("none")))
    first = make_dock(qgis_iface, manager)
    first.stepsSpin.setValue(7)
    first.bandSpin.setValue(12)
    first.vocabularySpin.setValue(config.RULE_OFF)
    first.minConfidenceSpin.setValue(0.65)
    first.showConfidenceCheck.setChecked(True)
    first.shutdown()
    second = make_dock(qgis_iface, manager)
    try:
        assert second.stepsSpin.value() == 7 and second.bandSpin.value() == 12
        assert second.vocabularySpin.value() == config.RULE_OFF and second.vocabularySpin.text() == "Off"
        assert second.minConfidenceSpin.value() == pytest.approx(0.65)
        assert second.showConfidenceCheck.isChecked()
        saved = config.UserSettings.load()
        assert (saved.steps, saved.band, saved.vocabulary, saved.show_confidence) == (7, 12, -1, True)
    finally:
        second.shutdown()
        first.deleteLater()
        second.deleteLater()


def test_rule_widgets_show_the_model_defaults_and_off(qgis_iface, project, dock_settings):
    manager = BackendManager(locate=lambda: (_ for _ in ()).throw(BackendUnavailable("none")))
    dock = make_dock(qgis_iface, manager)
    try:
        card = config.read_model_card(config.bundled_models()["dubai5"])
        sampler = card.get("sampler") or {}
        for spin, key in ((dock.bandSpin, "band"), (dock.vocabularySpin, "vocabulary")):
            assert spin.value() == config.RULE_DEFAULT and spin.text().startswith("Model default")
            if isinstance(sampler.get(key), int) and sampler[key] >= 0:
                assert spin.text() == f"Model default ({sampler[key]} px)"
            spin.setValue(config.RULE_OFF)
            assert spin.text() == "Off"
            spin.setValue(5)
            spin.lineEdit().setText("-1")
            spin.interpretText()
            assert spin.value() == config.RULE_OFF and spin.text() == "Off"
            spin.setValue(0)
            assert spin.text() == "0"
        assert dock.minConfidenceSpin.text().startswith("Model default")
        assert config.rule_field(config.RULE_DEFAULT) is None and config.rule_field(config.RULE_OFF) == -1
        assert config.confidence_field(config.CONFIDENCE_DEFAULT) is None
        assert config.confidence_field(0.0) == 0.0
    finally:
        dock.shutdown()
        dock.deleteLater()


def test_show_confidence_and_changed_pixels_add_their_styled_layers(dock, sample_raster, dock_settings, tmp_path):
    import numpy as np
    from osgeo import gdal
    from qgis.core import QgsSingleBandPseudoColorRenderer

    small = tmp_path / "small.tif"
    gdal.Translate(str(small), str(sample_raster), srcWin=[300, 300, 128, 96])
    dock.layerCombo.setLayer(add_sample(small, "dubai"))
    dock.set_extent_mode("layer")
    dock.showConfidenceCheck.setChecked(True)
    dock.showChangesCheck.setChecked(True)
    dock.minConfidenceSpin.setValue(0.4)
    ok, message = run_and_wait(dock)
    assert ok, message
    group = result_group("dubai")
    names = [node.name() for node in group.findLayers()]
    assert names == [CONFIDENCE.format("dubai"), CHANGES.format("dubai"), REFINED.format("dubai"),
                     COARSE.format("dubai")]
    confidence_node, changes_node, refined_node, coarse_node = group.findLayers()
    confidence, refined = confidence_node.layer(), refined_node.layer()
    assert confidence_node.isVisible() and confidence.isValid()
    assert isinstance(confidence.renderer(), QgsSingleBandPseudoColorRenderer)
    assert confidence.extent() == refined.extent() and (confidence.width(), confidence.height()) == (128, 96)
    assert confidence.crs() == refined.crs()
    assert confidence.dataProvider().dataType(1) == Qgis.Float32
    assert Path(confidence.source()).parent == dock_settings

    # The changed pixels: shown over the class map, exactly where the refined and the coarse map differ.
    changes = changes_node.layer()
    assert changes_node.isVisible() and isinstance(changes.renderer(), QgsPalettedRasterRenderer)
    assert changes.extent() == refined.extent() and (changes.width(), changes.height()) == (128, 96)

    def read(layer):
        dataset = gdal.Open(layer.source())
        try:
            band = dataset.GetRasterBand(1)
            return band.ReadAsArray(), band.GetNoDataValue()
        finally:
            dataset = None

    (marked, nodata), (ids, _), (coarse_ids, _) = read(changes), read(refined), read(coarse_node.layer())
    valid = marked != nodata
    assert valid.any()
    assert np.array_equal(marked[valid] == 1, (ids != coarse_ids)[valid])
    assert config.UserSettings.load().show_changes, "the choice is kept for the next run"


def test_the_panel_speaks_the_installed_translation(qgis_iface, project, dock_settings):
    """Every text of the panel goes through the plugin's translation context: a translator for it is used."""
    import re

    from qgis.PyQt.QtCore import QCoreApplication, QTranslator

    from idgbr_qgis.i18n import CONTEXT

    class Shouting(QTranslator):
        def translate(self, context, text, disambiguation=None, n=-1):  # noqa: ARG002 - Qt's signature
            if context != CONTEXT:
                return ""
            # Upper case, placeholders kept as a translator keeps them.
            return "".join(part if part.startswith("{") else part.upper()
                           for part in re.split(r"(\{[^}]*\})", text))

        def isEmpty(self) -> bool:  # noqa: N802 - Qt's name
            return False

    translator = Shouting()
    QCoreApplication.installTranslator(translator)
    manager = BackendManager(locate=lambda: (_ for _ in ()).throw(BackendUnavailable("none")))
    widget = make_dock(qgis_iface, manager)
    try:
        assert widget.runButton.text() == "RUN" and widget.drawRadio.text() == "DRAW ON THE MAP"
        assert widget.showChangesCheck.text() == "SHOW CHANGED PIXELS"
        assert widget.bandsGroup.title() == "BAND MAPPING"
    finally:
        QCoreApplication.removeTranslator(translator)
        widget.shutdown()
        widget.deleteLater()
