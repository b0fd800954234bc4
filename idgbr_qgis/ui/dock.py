"""The IDGBR dock: pick a raster and an extent, run the refiner in the background, get a styled layer.

Layers, widgets and the project are touched only in the main thread; the backend work is a RefineTask in
QGIS's task manager, so QGIS never blocks and the run can be cancelled at any moment.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayerProxyModel,
    QgsMessageLog,
    QgsProcessingException,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
)
from qgis.gui import QgsDockWidget, QgsDoubleSpinBox, QgsMapLayerComboBox, QgsSpinBox
from qgis.PyQt.QtCore import pyqtSignal
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from ..processing import sources
from ..styling import apply_class_style, apply_confidence_style, classes_from_color_table
from . import config
from .device import describe_device
from .extent_tool import ExtentMapTool
from .refine_task import RefineTask, RunOutcome, RunRequest

LOG_TAG = "IDGBR"
REFINED_SUFFIX = " — IDGBR refined"
COARSE_SUFFIX = " — coarse"
CONFIDENCE_SUFFIX = " — confidence"
OFF_TEXT = "Off"
EXTENT_DRAWN, EXTENT_VIEW, EXTENT_LAYER = "drawn", "view", "layer"


class DockError(Exception):
    """A problem with what the user picked; the message says what to change."""


class RuleSpinBox(QgsSpinBox):
    """Pixels of a refiner rule (band, vocabulary): the minimum reads "Model default", -1 reads "Off".

    "-1" or "Off" can be typed; ``validate`` is left to QgsSpinBox (its Python signature differs between
    QGIS versions)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setRange(config.RULE_DEFAULT, config.MAX_RULE_PX)
        self.setSpecialValueText("Model default")
        self.setClearValue(config.RULE_DEFAULT)
        self.setValue(config.RULE_DEFAULT)

    def textFromValue(self, value: int) -> str:  # noqa: N802 - Qt API
        if value == config.RULE_OFF:
            return OFF_TEXT
        return super().textFromValue(value)

    def valueFromText(self, text: str) -> int:  # noqa: N802 - Qt API
        if text.strip().lower() == OFF_TEXT.lower():
            return config.RULE_OFF
        return super().valueFromText(text)


class IdgbrDock(QgsDockWidget):
    """The IDGBR panel. `shutdown()` must be called before the plugin unloads."""

    #: the refined layer was added to the project (its id)
    resultAdded = pyqtSignal(str)
    #: a run ended: (success, message)
    runFinished = pyqtSignal(bool, str)

    def __init__(self, iface: Any, backend_manager: Any, parent: Optional[QWidget] = None) -> None:
        super().__init__("IDGBR", parent or (iface.mainWindow() if iface is not None else None))
        self.setObjectName("IdgbrDock")
        self.iface = iface
        self.manager = backend_manager
        self.canvas = iface.mapCanvas()
        self.settings = config.UserSettings.load()
        self.task: Optional[RefineTask] = None
        self._health_task: Optional[QgsTask] = None
        self._health_requested = False
        self._alive = True
        self.tool = ExtentMapTool(self.canvas)
        self.tool.extentDrawn.connect(self._extent_drawn)
        self._drawn_extent: Optional[QgsRectangle] = None
        self._drawn_crs = QgsCoordinateReferenceSystem()
        self._build_ui()
        self._load_settings_into_widgets()
        self._update_state()

    # ============================================================================================ layout
    def _build_ui(self) -> None:
        body = QWidget(self)
        layout = QVBoxLayout(body)
        form = QFormLayout()

        self.layerCombo = QgsMapLayerComboBox(body)
        self.layerCombo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.layerCombo.setToolTip("The image to refine (any raster layer; the model reads bands from its card).")
        form.addRow("Raster", self.layerCombo)

        self.coarseSourceCombo = QComboBox(body)
        self.coarseSourceCombo.addItem("Bundled model", "bundled")
        self.coarseSourceCombo.addItem("Existing class layer", "layer")
        self.coarseSourceCombo.setToolTip(
            "Where the coarse class map comes from: IDGBR's own segmenter, or a class-id raster made by any "
            "other model (its ids must be the model's class ids)."
        )
        form.addRow("Coarse map", self.coarseSourceCombo)
        self.coarseLayerCombo = QgsMapLayerComboBox(body)
        self.coarseLayerCombo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        form.addRow("Class layer", self.coarseLayerCombo)

        self.modelLabel = QLabel(body)
        self.modelLabel.setWordWrap(True)
        form.addRow("Model", self.modelLabel)
        layout.addLayout(form)

        extent_box = QGroupBox("Extent", body)
        extent_layout = QVBoxLayout(extent_box)
        self.extentGroup = QButtonGroup(self)
        self.drawRadio = QRadioButton("Draw on the map")
        self.viewRadio = QRadioButton("Current map view")
        self.layerRadio = QRadioButton("Whole layer")
        for button, key in ((self.drawRadio, EXTENT_DRAWN), (self.viewRadio, EXTENT_VIEW),
                            (self.layerRadio, EXTENT_LAYER)):
            button.setProperty("extentMode", key)
            self.extentGroup.addButton(button)
        draw_row = QHBoxLayout()
        draw_row.addWidget(self.drawRadio)
        self.drawButton = QPushButton("Draw")
        self.drawButton.setToolTip("Drag a rectangle on the map; Esc abandons it.")
        draw_row.addWidget(self.drawButton)
        draw_row.addStretch(1)
        extent_layout.addLayout(draw_row)
        self.extentLabel = QLabel("No extent drawn yet.")
        self.extentLabel.setWordWrap(True)
        extent_layout.addWidget(self.extentLabel)
        extent_layout.addWidget(self.viewRadio)
        extent_layout.addWidget(self.layerRadio)
        self.drawRadio.setChecked(True)
        layout.addWidget(extent_box)

        params = QFormLayout()
        self.stepsSpin = QgsSpinBox(body)
        self.stepsSpin.setRange(config.MODEL_DEFAULT, config.MAX_STEPS)
        self.stepsSpin.setSpecialValueText("Model default")
        self.stepsSpin.setClearValue(config.MODEL_DEFAULT)
        self.stepsSpin.setToolTip("Diffusion steps: more steps, finer boundaries, longer runs.")
        params.addRow("Steps", self.stepsSpin)
        self.bandSpin = RuleSpinBox(body)
        self.bandSpin.setToolTip("The refiner may change a pixel only this many pixels from a coarse class "
                                 "boundary. 0 keeps the coarse map; Off (-1) lifts the rule.")
        params.addRow("Change band (px)", self.bandSpin)
        self.vocabularySpin = RuleSpinBox(body)
        self.vocabularySpin.setToolTip("A pixel may only take a class the coarse map has within this many pixels, "
                                       "so regions are never invented or erased. Off (-1) lifts the rule.")
        params.addRow("Vocabulary (px)", self.vocabularySpin)
        self.minConfidenceSpin = QgsDoubleSpinBox(body)
        self.minConfidenceSpin.setDecimals(2)
        self.minConfidenceSpin.setSingleStep(0.05)
        self.minConfidenceSpin.setRange(config.CONFIDENCE_DEFAULT, 1.0)
        self.minConfidenceSpin.setSpecialValueText("Model default")
        self.minConfidenceSpin.setClearValue(config.CONFIDENCE_DEFAULT)
        self.minConfidenceSpin.setToolTip("A pixel takes the refiner's class only where the refiner is at least "
                                          "this sure (0-1); elsewhere it keeps the coarse class. 0 switches the "
                                          "gate off, 1 keeps the coarse map.")
        params.addRow("Min. confidence", self.minConfidenceSpin)
        self.showConfidenceCheck = QCheckBox("Show confidence", body)
        self.showConfidenceCheck.setToolTip("Also add the refiner's confidence to the result group: red where it "
                                            "was unsure, clear where it was sure.")
        params.addRow("", self.showConfidenceCheck)
        layout.addLayout(params)

        device_row = QHBoxLayout()
        self.deviceLabel = QLabel("Device: backend not started")
        self.deviceLabel.setWordWrap(True)
        device_row.addWidget(self.deviceLabel, 1)
        self.checkButton = QPushButton("Check")
        self.checkButton.setToolTip("Start or contact the backend and show the device it computes on.")
        device_row.addWidget(self.checkButton)
        layout.addLayout(device_row)
        self.setupButton = QPushButton("Set up backend…")
        self.setupButton.setToolTip("Install PyTorch and the IDGBR backend in a dedicated environment.")
        self.setupButton.setVisible(False)
        layout.addWidget(self.setupButton)

        buttons = QHBoxLayout()
        self.runButton = QPushButton("Run")
        self.cancelButton = QPushButton("Cancel")
        self.settingsButton = QPushButton("Settings…")
        buttons.addWidget(self.runButton)
        buttons.addWidget(self.cancelButton)
        buttons.addStretch(1)
        buttons.addWidget(self.settingsButton)
        layout.addLayout(buttons)
        self.progressBar = QProgressBar(body)
        self.progressBar.setRange(0, 100)
        self.progressBar.setValue(0)
        layout.addWidget(self.progressBar)
        self.statusLabel = QLabel("")
        self.statusLabel.setWordWrap(True)
        layout.addWidget(self.statusLabel)
        layout.addStretch(1)
        self.setWidget(body)

        self.layerCombo.layerChanged.connect(self._update_state)
        self.coarseSourceCombo.currentIndexChanged.connect(self._update_state)
        self.extentGroup.buttonClicked.connect(lambda _b: self._update_state())
        self.drawButton.clicked.connect(self.start_drawing)
        self.runButton.clicked.connect(self.run)
        self.cancelButton.clicked.connect(self.cancel)
        self.checkButton.clicked.connect(self.check_backend)
        self.setupButton.clicked.connect(self.open_setup)
        self.settingsButton.clicked.connect(self.open_settings)
        for spin in (self.stepsSpin, self.bandSpin, self.vocabularySpin, self.minConfidenceSpin):
            spin.valueChanged.connect(self._save_run_settings)
        self.showConfidenceCheck.toggled.connect(self._save_run_settings)

    def _load_settings_into_widgets(self) -> None:
        self.settings = config.UserSettings.load()
        for widget, value in ((self.stepsSpin, self.settings.steps), (self.bandSpin, self.settings.band),
                              (self.vocabularySpin, self.settings.vocabulary),
                              (self.minConfidenceSpin, self.settings.min_confidence),
                              (self.showConfidenceCheck, self.settings.show_confidence)):
            widget.blockSignals(True)
            if isinstance(widget, QCheckBox):
                widget.setChecked(bool(value))
            else:
                widget.setValue(value)
            widget.blockSignals(False)
        card = self._card()
        sampler = card.get("sampler") or {}
        self.stepsSpin.setSpecialValueText(_default_text(sampler, "steps"))
        self.bandSpin.setSpecialValueText(_default_text(sampler, "band", " px"))
        self.vocabularySpin.setSpecialValueText(_default_text(sampler, "vocabulary", " px"))
        self.minConfidenceSpin.setSpecialValueText(_default_text(sampler, "min_confidence"))
        name = card.get("name") or self.settings.model
        classes = ", ".join(str(c.get("name")) for c in card.get("classes") or [])
        self.modelLabel.setText(f"{name} ({classes})" if classes else str(name))
        self.modelLabel.setToolTip(f"Device setting: {self.settings.device}. Change both in Settings….")

    def _save_run_settings(self) -> None:
        self.settings.steps = self.stepsSpin.value()
        self.settings.band = self.bandSpin.value()
        self.settings.vocabulary = self.vocabularySpin.value()
        self.settings.min_confidence = self.minConfidenceSpin.value()
        self.settings.show_confidence = self.showConfidenceCheck.isChecked()
        self.settings.save()

    def _card(self) -> Dict[str, Any]:
        path = config.model_file(self.settings.model)
        return config.read_model_card(path) if path else {}

    # ============================================================================================= state
    def extent_mode(self) -> str:
        button = self.extentGroup.checkedButton()
        return str(button.property("extentMode")) if button is not None else EXTENT_LAYER

    def set_extent_mode(self, mode: str) -> None:
        for button in self.extentGroup.buttons():
            if button.property("extentMode") == mode:
                button.setChecked(True)
        self._update_state()

    def is_running(self) -> bool:
        return self.task is not None

    def _update_state(self, *_args: Any) -> None:
        running = self.is_running()
        bundled = self.coarseSourceCombo.currentData() == "bundled"
        layer = self.layerCombo.currentLayer()
        self.coarseLayerCombo.setEnabled(not bundled and not running)
        self.coarseLayerCombo.setExceptedLayerList([layer] if layer is not None else [])
        self.drawButton.setEnabled(self.extent_mode() == EXTENT_DRAWN and not running)
        for widget in (self.layerCombo, self.coarseSourceCombo, self.stepsSpin, self.bandSpin, self.vocabularySpin,
                       self.minConfidenceSpin, self.showConfidenceCheck, self.drawRadio, self.viewRadio,
                       self.layerRadio, self.settingsButton):
            widget.setEnabled(not running)
        self.runButton.setEnabled(not running and layer is not None)
        self.cancelButton.setEnabled(running)

    # ============================================================================================ extent
    def start_drawing(self) -> None:
        """Make the extent tool the canvas's map tool (the Draw button)."""
        self.set_extent_mode(EXTENT_DRAWN)
        self.canvas.setMapTool(self.tool)
        self.statusLabel.setText("Drag a rectangle on the map.")

    def set_drawn_extent(self, extent: QgsRectangle, crs: Optional[QgsCoordinateReferenceSystem] = None) -> None:
        """Use `extent` (in `crs`, default the canvas CRS) as if it had been drawn, and show it on the map."""
        canvas_crs = self.canvas.mapSettings().destinationCrs()
        crs = crs if crs is not None else canvas_crs
        shown = QgsRectangle(extent)
        if crs.isValid() and canvas_crs.isValid() and crs != canvas_crs:
            shown = QgsCoordinateTransform(crs, canvas_crs, QgsProject.instance()).transformBoundingBox(shown)
        self.tool.setExtent(shown)
        self._extent_drawn(shown)

    def _extent_drawn(self, extent: QgsRectangle) -> None:
        self._drawn_extent = QgsRectangle(extent)
        self._drawn_crs = self.canvas.mapSettings().destinationCrs()
        self.set_extent_mode(EXTENT_DRAWN)
        self.extentLabel.setText(f"{extent.toString(1)} ({self._drawn_crs.authid() or 'map units'})"
                                 + self._size_hint(extent, self._drawn_crs))
        self.statusLabel.setText("Extent set. Press Run.")

    def _size_hint(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> str:
        """' — about W × H px of <layer>' for the label, from the layer's pixel size."""
        layer = self.layerCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or layer.width() <= 0 or layer.rasterUnitsPerPixelX() <= 0:
            return ""
        try:
            rect = self._to_layer_crs(extent, crs, layer)
        except DockError:
            return ""
        rect = rect.intersect(layer.extent())
        if rect.isEmpty():
            return " — outside the selected layer"
        columns = round(rect.width() / layer.rasterUnitsPerPixelX())
        rows = round(rect.height() / layer.rasterUnitsPerPixelY())
        return f" — about {columns} × {rows} px"

    @staticmethod
    def _to_layer_crs(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsRasterLayer) -> QgsRectangle:
        if not crs.isValid() or not layer.crs().isValid() or crs == layer.crs():
            return QgsRectangle(extent)
        try:
            return QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transformBoundingBox(extent)
        except Exception as exc:  # QgsCsException: the extent lies outside the layer CRS's valid area
            raise DockError(f"The extent cannot be expressed in the layer's CRS {layer.crs().authid()} ({exc}). "
                            "Draw an extent over the layer.") from exc

    def requested_extent(self, layer: QgsRasterLayer
                         ) -> Tuple[Optional[Tuple[float, float, float, float]], Optional[str], Optional[QgsRectangle]]:
        """(extent, its CRS authid, the extent in the layer's CRS) for the job; (None, None, None) = whole layer.

        The backend snaps the extent outward to the input's pixel grid, so any CRS works. A layer without a
        CRS is drawn unprojected by QGIS: map coordinates are its own, and they are sent without a CRS.
        """
        mode = self.extent_mode()
        if mode == EXTENT_LAYER:
            return None, None, None
        if mode == EXTENT_DRAWN:
            if self._drawn_extent is None:
                raise DockError("No extent drawn yet: press Draw and drag a rectangle on the map, or choose "
                                "'Current map view' or 'Whole layer'.")
            rect, crs = QgsRectangle(self._drawn_extent), self._drawn_crs
        else:
            rect, crs = QgsRectangle(self.canvas.extent()), self.canvas.mapSettings().destinationCrs()
        if rect.isEmpty():
            raise DockError("The extent is empty: draw a rectangle with some width and height.")
        layer_rect = self._to_layer_crs(rect, crs, layer)
        if not layer.extent().intersects(layer_rect):
            raise DockError(f"The extent does not overlap the layer '{layer.name()}': draw it over the layer, or "
                            "choose 'Whole layer'.")
        if not layer.crs().isValid() or not crs.isValid():
            return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()), None, rect
        if not crs.authid():
            # A custom CRS has no code the backend understands: send the extent in the layer's CRS instead.
            rect, crs = layer_rect, layer.crs()
            if not crs.authid():
                return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()), None, layer_rect
        return (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()), crs.authid(), layer_rect

    # =============================================================================================== run
    def run(self) -> Optional[RefineTask]:
        """Start a run with the panel's choices (the Run button); returns the task, or None with a message."""
        if self.is_running():
            return None
        try:
            request = self._request()
        except (DockError, QgsProcessingException) as exc:
            self._message(str(exc.args[0] if exc.args else exc), Qgis.Warning)
            return None
        task = RefineTask(self.manager, request, on_done=self._task_done)
        task.progressChanged.connect(self._task_progress)
        task.statusChanged.connect(self.statusLabel.setText)
        self.task = task
        self.progressBar.setValue(0)
        self.statusLabel.setText("Starting…")
        self._update_state()
        QgsApplication.taskManager().addTask(task)
        return task

    def _request(self) -> RunRequest:
        self.settings = config.UserSettings.load()
        layer = self.layerCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise DockError("Choose a raster layer to refine.")
        source = sources.describe(layer)
        coarse = None
        if self.coarseSourceCombo.currentData() == "layer":
            coarse_layer = self.coarseLayerCombo.currentLayer()
            if not isinstance(coarse_layer, QgsRasterLayer):
                raise DockError("Choose the class layer to use as the coarse map, or pick 'Bundled model'.")
            if coarse_layer.id() == layer.id():
                raise DockError("The class layer must be a class map, not the image itself.")
            coarse = sources.describe(coarse_layer)
        extent, extent_crs, layer_rect = self.requested_extent(layer)
        model_path = config.model_file(self.settings.model)
        if model_path is None:
            raise DockError(f"The model '{self.settings.model}' is not installed: choose a bundled model or an "
                            "existing .safetensors file in Settings….")
        card = config.read_model_card(model_path)
        folder = self.settings.results_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DockError(f"Cannot create the results folder {folder} ({exc}): choose another one in "
                            "Settings….") from exc
        stem = f"{_safe_name(layer.name())}_{time.strftime('%Y%m%d-%H%M%S')}"
        output = _unique(folder / f"{stem}_refined.tif")
        coarse_output = None if coarse is not None else _unique(folder / f"{stem}_coarse.tif")
        confidence = _unique(folder / f"{stem}_confidence.tif") if self.showConfidenceCheck.isChecked() else None
        return RunRequest(
            layer_name=layer.name(),
            source=source,
            output=output,
            coarse_output=coarse_output,
            coarse=coarse,
            extent=extent,
            extent_crs=extent_crs,
            extent_layer_crs=layer_rect,
            model=self.settings.job_model(),
            device=self.settings.device,
            steps=None if self.stepsSpin.value() == config.MODEL_DEFAULT else self.stepsSpin.value(),
            band=config.rule_field(self.bandSpin.value()),
            vocabulary=config.rule_field(self.vocabularySpin.value()),
            min_confidence=config.confidence_field(self.minConfidenceSpin.value()),
            confidence=confidence,
            pixel_size_m=float(card.get("pixel_size_m") or 0.5),
            input_pixel_size=config.pixel_size_field(self.settings.pixel_size),
            transform_context=QgsProject.instance().transformContext(),
        )

    def cancel(self) -> None:
        """Cancel the running task (the Cancel button); the backend job stops and leaves no output."""
        if self.task is not None:
            self.statusLabel.setText("Cancelling…")
            self.task.cancel()

    def _task_progress(self, value: float) -> None:
        self.progressBar.setValue(int(value))

    def _task_done(self, task: RefineTask, outcome: RunOutcome) -> None:
        if not self._alive:
            return
        if task is self.task:
            self.task = None
        self._update_state()
        if outcome.cancelled:
            self.progressBar.setValue(0)
            self._finish(False, "Cancelled: no layer was added.", Qgis.Info)
            return
        if outcome.error:
            self.progressBar.setValue(0)
            self.setupButton.setVisible(outcome.setup_needed)
            self._finish(False, outcome.error, Qgis.Critical)
            return
        try:
            refined = self._add_result(task.request, outcome)
        except DockError as exc:
            self._finish(False, str(exc), Qgis.Critical)
            return
        self.progressBar.setValue(100)
        for note in outcome.notes:
            self._message(note, Qgis.Info)
        device = f" on {outcome.device}" if outcome.device else ""
        self._finish(True, f"Added '{refined.name()}' in {outcome.seconds:.1f} s{device}.", Qgis.Success)
        self.resultAdded.emit(refined.id())

    def _finish(self, ok: bool, message: str, level: Qgis.MessageLevel) -> None:
        self.statusLabel.setText(message)
        self._message(message, level)
        self.runFinished.emit(ok, message)

    # ============================================================================================ result
    def _add_result(self, request: RunRequest, outcome: RunOutcome) -> QgsRasterLayer:
        """Load the refined map (with the confidence above it when asked for, and the coarse map, hidden) into
        one group; all valid or none added."""
        assert outcome.refined is not None
        refined = QgsRasterLayer(str(outcome.refined), f"{request.layer_name}{REFINED_SUFFIX}", "gdal")
        layers: List[QgsRasterLayer] = [refined]
        confidence = None
        if outcome.confidence is not None:
            confidence = QgsRasterLayer(str(outcome.confidence), f"{request.layer_name}{CONFIDENCE_SUFFIX}", "gdal")
        coarse_path = outcome.coarse or (request.coarse.path if request.coarse else None)
        coarse = None
        if coarse_path is not None:
            coarse = QgsRasterLayer(str(coarse_path), f"{request.layer_name}{COARSE_SUFFIX}", "gdal")
            layers.append(coarse)
        broken = [lyr for lyr in layers + ([confidence] if confidence is not None else []) if not lyr.isValid()]
        if broken:
            raise DockError(f"QGIS cannot open the result {broken[0].source()}: check free disk space and the "
                            "results folder in Settings…, then run again.")
        classes = outcome.classes or self._card().get("classes") or []
        for layer in layers:
            try:
                apply_class_style(layer, classes or classes_from_color_table(layer))
            except ValueError as exc:
                self._message(f"The result is not styled ({exc}); it keeps its own colour table.", Qgis.Warning)
        project = QgsProject.instance()
        root = project.layerTreeRoot()
        group = root.insertGroup(0, f"{request.layer_name} — IDGBR")
        if confidence is not None:
            # On top: clear where the refiner was sure, red where it was not, over the class map.
            apply_confidence_style(confidence)
            project.addMapLayer(confidence, False)
            group.addLayer(confidence)
        project.addMapLayer(refined, False)
        group.addLayer(refined)
        if coarse is not None:
            project.addMapLayer(coarse, False)
            node = group.addLayer(coarse)
            node.setItemVisibilityChecked(False)  # for comparison: switch it on to see the coarse map
        return refined

    # =========================================================================================== backend
    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
        super().showEvent(event)
        if not self._health_requested:
            # Warm the backend while the user picks an extent; the first run then skips the cold start.
            self._health_requested = True
            self.check_backend()

    def check_backend(self) -> None:
        """Start or contact the backend in a background task and show its device (the Check button)."""
        if self._health_task is not None or not self._alive:
            return
        self.deviceLabel.setText("Device: starting the backend…")
        self.checkButton.setEnabled(False)
        task = QgsTask.fromFunction("IDGBR: checking the backend", _health, self.manager,
                                    on_finished=self._health_done)
        self._health_task = task
        QgsApplication.taskManager().addTask(task)

    def _health_done(self, exception: Optional[BaseException], result: Any = None) -> None:
        self._health_task = None
        if not self._alive:
            return
        self.checkButton.setEnabled(True)
        if exception is not None:
            from ..backend import BackendUnavailable
            from ..backend_client import BackendError

            # No interpreter, or one that cannot start the backend: the setup is the fix for both.
            self.setupButton.setVisible(isinstance(exception, (BackendUnavailable, BackendError)))
            self.deviceLabel.setText("Device: backend unavailable")
            self.deviceLabel.setToolTip(str(exception))
            self._message(str(exception), Qgis.Warning)
            return
        self.setupButton.setVisible(False)
        text, tip = describe_device(result or {})
        self.deviceLabel.setText(text)
        self.deviceLabel.setToolTip(tip)

    def open_setup(self) -> None:
        from .setup_dialog import SetupDialog

        dialog = SetupDialog(self, self.manager)
        dialog.backendReady.connect(lambda _python: self.setupButton.setVisible(False))
        dialog.exec_()
        if not self.setupButton.isVisible():
            self.check_backend()

    def open_settings(self) -> None:
        from .settings_dialog import SettingsDialog

        dialog = SettingsDialog(self.manager, self)
        if dialog.exec_():
            self._load_settings_into_widgets()

    # ========================================================================================= messages
    def _message(self, text: str, level: Qgis.MessageLevel) -> None:
        QgsMessageLog.logMessage(text, LOG_TAG, level)
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is not None:
            duration = 0 if level in (Qgis.Critical, Qgis.Warning) else 5
            bar.pushMessage(LOG_TAG, text, level, duration)

    # ========================================================================================= lifecycle
    def shutdown(self) -> None:
        """Cancel the run, drop the map tool and its rubber band; the dock may then be deleted."""
        self._alive = False
        task, self.task = self.task, None
        if task is not None:
            task.on_done = None
            with contextlib.suppress(RuntimeError, TypeError):  # already deleted by the task manager
                task.progressChanged.disconnect(self._task_progress)
            with contextlib.suppress(RuntimeError):
                task.cancel()
        if self.canvas.mapTool() is self.tool:
            self.canvas.unsetMapTool(self.tool)
        self.tool.release()
        with contextlib.suppress(TypeError):
            self.tool.extentDrawn.disconnect(self._extent_drawn)


def _health(task: QgsTask, manager: Any) -> Dict[str, Any]:
    """Worker thread: a live client (starting the service if needed) and its /health."""
    return manager.client().health()


def _default_text(sampler: Dict[str, Any], key: str, unit: str = "") -> str:
    """"Model default (8 px)" from the card's sampler section; "Off" for a rule the card switches off."""
    if key not in sampler:
        return "Model default"
    try:
        value = float(sampler[key])
    except (TypeError, ValueError):
        return "Model default"
    off = (key == "min_confidence" and value <= 0) or (key in ("band", "vocabulary") and value < 0)
    return f"Model default ({OFF_TEXT.lower() if off else f'{value:g}{unit}'})"


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).strip("._")
    return cleaned[:60] or "raster"


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate
