"""The IDGBR dock: pick a raster and an extent, run the refiner in the background, get styled layers.

Layers, widgets and the project are touched only in the main thread; the run is a `jobs.JobSpec` that a
RefineTask hands to the job runner in QGIS's task manager, so QGIS never blocks and the run can be
cancelled at any moment.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsMapLayer,
    QgsMapLayerProxyModel,
    QgsMessageLog,
    QgsPalettedRasterRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
    QgsTask,
)
from qgis.gui import QgsCollapsibleGroupBox, QgsDockWidget, QgsDoubleSpinBox, QgsMapLayerComboBox, QgsSpinBox
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

from ..backend_client import BackendError
from ..backend_process import BackendUnavailable
from ..i18n import tr
from ..jobs import inputs
from ..jobs.outcome import JobError, JobResult, result_name, user_message
from ..jobs.spec import JobExtent, JobSpec
from ..styling import apply_changes_style, apply_class_style, apply_confidence_style, classes_from_color_table
from . import config
from .device import describe_device
from .extent_tool import ExtentMapTool
from .refine_task import RefineTask

LOG_TAG = "IDGBR"
EXTENT_DRAWN, EXTENT_VIEW, EXTENT_LAYER = "drawn", "view", "layer"
MODEL_BANDS = 3  # the bundled models read red, green, blue
# The job's fields as the panel calls them: a failure points at the control to change (translated on use).
FIELD_LABELS = {"input": "Raster", "coarse": "Class layer", "extent": "Extent", "bands": "Band mapping",
                "steps": "Steps", "band": "Change band (px)", "vocabulary": "Vocabulary (px)",
                "min_confidence": "Min. confidence", "model": "Settings… ▸ Model", "device": "Settings… ▸ Device",
                "pixel_size": "Settings… ▸ Input pixel size", "precision": "Settings… ▸ Precision",
                "output": "Settings… ▸ Results folder", "confidence": "Settings… ▸ Results folder"}


class DockError(Exception):
    """A problem with what the user picked; the message says what to change."""


class RuleSpinBox(QgsSpinBox):
    """Pixels of a refiner rule (band, vocabulary): the minimum reads "Model default", -1 reads "Off".

    "-1" or "Off" can be typed; ``validate`` is left to QgsSpinBox (its Python signature differs between
    QGIS versions)."""

    def __init__(self, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setRange(config.RULE_DEFAULT, config.MAX_RULE_PX)
        self.setSpecialValueText(tr("Model default"))
        self.setClearValue(config.RULE_DEFAULT)
        self.setValue(config.RULE_DEFAULT)

    def textFromValue(self, value: int) -> str:  # noqa: N802 - Qt API
        if value == config.RULE_OFF:
            return _off_text()
        return super().textFromValue(value)

    def valueFromText(self, text: str) -> int:  # noqa: N802 - Qt API
        if text.strip().lower() in ("off", _off_text().lower()):
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
        self._layer_chosen = False  # the user picked the raster: pre-selection leaves it alone
        self._adding_results = False
        self.tool = ExtentMapTool(self.canvas)
        self.tool.extentDrawn.connect(self._extent_drawn)
        self._drawn_extent: Optional[QgsRectangle] = None
        self._drawn_crs = QgsCoordinateReferenceSystem()
        self._build_ui()
        self._load_settings_into_widgets()
        self.preselect_layers()
        self._fit_band_mapping(self.layerCombo.currentLayer())
        QgsProject.instance().layersAdded.connect(self._layers_added)
        self._update_state()

    # ============================================================================================ layout
    def _build_ui(self) -> None:
        body = QWidget(self)
        layout = QVBoxLayout(body)
        form = QFormLayout()

        self.layerCombo = QgsMapLayerComboBox(body)
        self.layerCombo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        self.layerCombo.setToolTip(tr("The image to refine (any raster layer; the model reads bands from its "
                                      "card, or those of 'Band mapping')."))
        form.addRow(tr("Raster"), self.layerCombo)

        self.coarseSourceCombo = QComboBox(body)
        self.coarseSourceCombo.addItem(tr("Bundled model"), "bundled")
        self.coarseSourceCombo.addItem(tr("Existing class layer"), "layer")
        self.coarseSourceCombo.setToolTip(tr(
            "Where the coarse class map comes from: IDGBR's own segmenter, or a class-id raster made by any "
            "other model (its ids must be the model's class ids)."
        ))
        form.addRow(tr("Coarse map"), self.coarseSourceCombo)
        self.coarseLayerCombo = QgsMapLayerComboBox(body)
        self.coarseLayerCombo.setFilters(QgsMapLayerProxyModel.RasterLayer)
        form.addRow(tr("Class layer"), self.coarseLayerCombo)

        self.modelLabel = QLabel(body)
        self.modelLabel.setWordWrap(True)
        form.addRow(tr("Model"), self.modelLabel)
        layout.addLayout(form)

        extent_box = QGroupBox(tr("Extent"), body)
        extent_layout = QVBoxLayout(extent_box)
        self.extentGroup = QButtonGroup(self)
        self.drawRadio = QRadioButton(tr("Draw on the map"))
        self.viewRadio = QRadioButton(tr("Current map view"))
        self.layerRadio = QRadioButton(tr("Whole layer"))
        for button, key in ((self.drawRadio, EXTENT_DRAWN), (self.viewRadio, EXTENT_VIEW),
                            (self.layerRadio, EXTENT_LAYER)):
            button.setProperty("extentMode", key)
            self.extentGroup.addButton(button)
        draw_row = QHBoxLayout()
        draw_row.addWidget(self.drawRadio)
        self.drawButton = QPushButton(tr("Draw"))
        self.drawButton.setToolTip(tr("Drag a rectangle on the map; Esc abandons it."))
        draw_row.addWidget(self.drawButton)
        draw_row.addStretch(1)
        extent_layout.addLayout(draw_row)
        self.extentLabel = QLabel(tr("No extent drawn yet."))
        self.extentLabel.setWordWrap(True)
        extent_layout.addWidget(self.extentLabel)
        extent_layout.addWidget(self.viewRadio)
        extent_layout.addWidget(self.layerRadio)
        self.drawRadio.setChecked(True)
        layout.addWidget(extent_box)

        params = QFormLayout()
        self.stepsSpin = QgsSpinBox(body)
        self.stepsSpin.setRange(config.MODEL_DEFAULT, config.MAX_STEPS)
        self.stepsSpin.setSpecialValueText(tr("Model default"))
        self.stepsSpin.setClearValue(config.MODEL_DEFAULT)
        self.stepsSpin.setToolTip(tr("Diffusion steps: more steps, finer boundaries, longer runs."))
        params.addRow(tr("Steps"), self.stepsSpin)
        self.bandSpin = RuleSpinBox(body)
        self.bandSpin.setToolTip(tr("The refiner may change a pixel only this many pixels from a coarse class "
                                    "boundary. 0 keeps the coarse map; Off (-1) lifts the rule."))
        params.addRow(tr("Change band (px)"), self.bandSpin)
        self.vocabularySpin = RuleSpinBox(body)
        self.vocabularySpin.setToolTip(tr("A pixel may only take a class the coarse map has within this many "
                                          "pixels, so regions are never invented or erased. Off (-1) lifts the "
                                          "rule."))
        params.addRow(tr("Vocabulary (px)"), self.vocabularySpin)
        self.minConfidenceSpin = QgsDoubleSpinBox(body)
        self.minConfidenceSpin.setDecimals(2)
        self.minConfidenceSpin.setSingleStep(0.05)
        self.minConfidenceSpin.setRange(config.CONFIDENCE_DEFAULT, 1.0)
        self.minConfidenceSpin.setSpecialValueText(tr("Model default"))
        self.minConfidenceSpin.setClearValue(config.CONFIDENCE_DEFAULT)
        self.minConfidenceSpin.setToolTip(tr("A pixel takes the refiner's class only where the refiner prefers it "
                                             "over the coarse class with at least this probability (0-1); elsewhere "
                                             "it keeps the coarse class. 0.5 or less lets every preferred change "
                                             "through, 1 keeps the coarse map."))
        params.addRow(tr("Min. confidence"), self.minConfidenceSpin)
        self.showConfidenceCheck = QCheckBox(tr("Show confidence"), body)
        self.showConfidenceCheck.setToolTip(tr("Also add the refiner's confidence to the result group: red where "
                                               "it was unsure, clear where it was sure."))
        params.addRow("", self.showConfidenceCheck)
        self.showChangesCheck = QCheckBox(tr("Show changed pixels"), body)
        self.showChangesCheck.setToolTip(tr("Also add the pixels where the refined map differs from the coarse "
                                            "map, so you see what the refiner did."))
        params.addRow("", self.showChangesCheck)
        layout.addLayout(params)

        # Advanced: which input bands feed the model's red, green and blue (e.g. for a 4-band NIR image).
        self.bandsGroup = QgsCollapsibleGroupBox(tr("Band mapping"), body)
        self.bandsGroup.setCheckable(True)
        self.bandsGroup.setChecked(False)
        self.bandsGroup.setCollapsed(True)
        self.bandsGroup.setToolTip(tr("The input bands the model reads, in the model's order. Off: the model's "
                                      "default bands (1, 2, 3)."))
        bands_layout = QHBoxLayout(self.bandsGroup)
        self.bandSpins: List[QgsSpinBox] = []
        self.bandLabels: List[QLabel] = []
        for _index in range(MODEL_BANDS):
            label, spin = QLabel(self.bandsGroup), QgsSpinBox(self.bandsGroup)
            spin.setRange(1, 1)
            self.bandLabels.append(label)
            self.bandSpins.append(spin)
            bands_layout.addWidget(label)
            bands_layout.addWidget(spin)
        bands_layout.addStretch(1)
        layout.addWidget(self.bandsGroup)

        device_row = QHBoxLayout()
        self.deviceLabel = QLabel(tr("Device: backend not started"))
        self.deviceLabel.setWordWrap(True)
        device_row.addWidget(self.deviceLabel, 1)
        self.checkButton = QPushButton(tr("Check"))
        self.checkButton.setToolTip(tr("Start or contact the backend and show the device it computes on."))
        device_row.addWidget(self.checkButton)
        layout.addLayout(device_row)
        self.setupButton = QPushButton(tr("Set up backend…"))
        self.setupButton.setToolTip(tr("Install PyTorch and the IDGBR backend in a dedicated environment."))
        self.setupButton.setVisible(False)
        layout.addWidget(self.setupButton)

        buttons = QHBoxLayout()
        self.runButton = QPushButton(tr("Run"))
        self.cancelButton = QPushButton(tr("Cancel"))
        self.settingsButton = QPushButton(tr("Settings…"))
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
        self.layerCombo.layerChanged.connect(self._fit_band_mapping)
        self.layerCombo.activated.connect(self._layer_picked)
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
        self.showChangesCheck.toggled.connect(self._save_run_settings)

    def _load_settings_into_widgets(self) -> None:
        self.settings = config.UserSettings.load()
        for widget, value in ((self.stepsSpin, self.settings.steps), (self.bandSpin, self.settings.band),
                              (self.vocabularySpin, self.settings.vocabulary),
                              (self.minConfidenceSpin, self.settings.min_confidence),
                              (self.showConfidenceCheck, self.settings.show_confidence),
                              (self.showChangesCheck, self.settings.show_changes)):
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
        self.modelLabel.setToolTip(tr("Device setting: {device}. Change both in Settings….").format(
            device=self.settings.device))
        names = [str(b) for b in card.get("bands") or []]
        for index, label in enumerate(self.bandLabels):
            label.setText(names[index].capitalize() if index < len(names) else tr("Band {n}").format(n=index + 1))

    def _save_run_settings(self) -> None:
        self.settings.steps = self.stepsSpin.value()
        self.settings.band = self.bandSpin.value()
        self.settings.vocabulary = self.vocabularySpin.value()
        self.settings.min_confidence = self.minConfidenceSpin.value()
        self.settings.show_confidence = self.showConfidenceCheck.isChecked()
        self.settings.show_changes = self.showChangesCheck.isChecked()
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
                       self.minConfidenceSpin, self.showConfidenceCheck, self.showChangesCheck, self.bandsGroup,
                       self.drawRadio, self.viewRadio, self.layerRadio, self.settingsButton):
            widget.setEnabled(not running)
        self.runButton.setEnabled(not running and layer is not None)
        self.cancelButton.setEnabled(running)

    # ============================================================================================ layers
    def preselect_layers(self) -> None:
        """Offer an image as the raster (the active layer when it is one) and a class map as the class layer.

        A class raster (one band) is never preferred as the image: the model reads three bands. What the user
        picked in the combo box stays."""
        rasters = [layer for layer in _project_rasters() if layer.isValid()]
        current = self.layerCombo.currentLayer()
        if not self._layer_chosen and not _looks_like_image(current):
            active = self.iface.activeLayer() if self.iface is not None else None
            candidates = ([active] if isinstance(active, QgsRasterLayer) else []) + rasters
            image = next((layer for layer in candidates if _looks_like_image(layer)), None)
            if image is not None:
                self.layerCombo.setLayer(image)
        image, coarse = self.layerCombo.currentLayer(), self.coarseLayerCombo.currentLayer()
        if coarse is None or coarse is image or _looks_like_image(coarse):
            classes = next((layer for layer in rasters if layer is not image and _looks_like_classes(layer)), None)
            if classes is not None:
                self.coarseLayerCombo.setLayer(classes)

    def _layers_added(self, _layers: List[QgsMapLayer]) -> None:
        if self._alive and not self._adding_results:  # the panel's own results change no choice
            self.preselect_layers()

    def _layer_picked(self, _index: int) -> None:
        self._layer_chosen = True  # only a pick in the combo box, never one made by code

    def band_mapping(self) -> Optional[List[int]]:
        """The input bands for the model's bands when 'Band mapping' is on, else None (the model's defaults)."""
        if not self.bandsGroup.isChecked():
            return None
        return [spin.value() for spin in self.bandSpins]

    def set_band_mapping(self, bands: Optional[List[int]]) -> None:
        """Switch 'Band mapping' on with ``bands`` (input band numbers in the model's order), or off with None."""
        self.bandsGroup.setChecked(bands is not None)
        if bands is not None:
            self.bandsGroup.setCollapsed(False)
            for spin, band in zip(self.bandSpins, bands):
                spin.setValue(band)

    def _fit_band_mapping(self, layer: Optional[QgsMapLayer]) -> None:
        """Band numbers of the new raster: its own count as the limit, the model's defaults where they exist."""
        count = layer.bandCount() if isinstance(layer, QgsRasterLayer) else 1
        defaults = [int(b) for b in self._card().get("bands_default") or range(1, MODEL_BANDS + 1)]
        for index, spin in enumerate(self.bandSpins):
            spin.setRange(1, max(1, count))
            default = defaults[index] if index < len(defaults) else index + 1
            spin.setClearValue(min(default, max(1, count)))
            if not self.bandsGroup.isChecked():
                spin.clear()

    # ============================================================================================ extent
    def start_drawing(self) -> None:
        """Make the extent tool the canvas's map tool (the Draw button)."""
        self.set_extent_mode(EXTENT_DRAWN)
        self.canvas.setMapTool(self.tool)
        self.statusLabel.setText(tr("Drag a rectangle on the map."))

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
        self.extentLabel.setText(f"{extent.toString(1)} ({self._drawn_crs.authid() or tr('map units')})"
                                 + self._size_hint(extent, self._drawn_crs))
        self.statusLabel.setText(tr("Extent set. Press Run."))

    def _size_hint(self, extent: QgsRectangle, crs: QgsCoordinateReferenceSystem) -> str:
        """' — about W × H px' for the label, from the selected layer's pixel size."""
        layer = self.layerCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer) or layer.width() <= 0 or layer.rasterUnitsPerPixelX() <= 0:
            return ""
        try:
            rect = self._to_layer_crs(extent, crs, layer)
        except DockError:
            return ""
        rect = rect.intersect(layer.extent())
        if rect.isEmpty():
            return tr(" — outside the selected layer")
        columns = round(rect.width() / layer.rasterUnitsPerPixelX())
        rows = round(rect.height() / layer.rasterUnitsPerPixelY())
        return tr(" — about {columns} × {rows} px").format(columns=columns, rows=rows)

    @staticmethod
    def _to_layer_crs(extent: QgsRectangle, crs: QgsCoordinateReferenceSystem, layer: QgsRasterLayer) -> QgsRectangle:
        if not crs.isValid() or not layer.crs().isValid() or crs == layer.crs():
            return QgsRectangle(extent)
        try:
            return QgsCoordinateTransform(crs, layer.crs(), QgsProject.instance()).transformBoundingBox(extent)
        except Exception as exc:  # QgsCsException: the extent lies outside the layer CRS's valid area
            raise DockError(tr("The extent cannot be expressed in the layer's CRS {crs} ({reason}). Draw an extent "
                               "over the layer.").format(crs=layer.crs().authid(), reason=exc)) from exc

    def requested_extent(self, layer: QgsRasterLayer) -> Optional[JobExtent]:
        """The extent of the run in its own CRS; None = the whole layer.

        The backend snaps the extent outward to the input's pixel grid, and layers that are copied first are
        cut in their own CRS, so any CRS works. A layer without a CRS is drawn unprojected by QGIS: map
        coordinates are then its own."""
        mode = self.extent_mode()
        if mode == EXTENT_LAYER:
            return None
        if mode == EXTENT_DRAWN:
            if self._drawn_extent is None:
                raise DockError(tr("No extent drawn yet: press Draw and drag a rectangle on the map, or choose "
                                   "'Current map view' or 'Whole layer'."))
            rect, crs = QgsRectangle(self._drawn_extent), self._drawn_crs
        else:
            rect, crs = QgsRectangle(self.canvas.extent()), self.canvas.mapSettings().destinationCrs()
        if rect.isEmpty():
            raise DockError(tr("The extent is empty: draw a rectangle with some width and height."))
        if not layer.extent().intersects(self._to_layer_crs(rect, crs, layer)):
            raise DockError(tr("The extent does not overlap the layer '{name}': draw it over the layer, or choose "
                               "'Whole layer'.").format(name=layer.name()))
        return JobExtent(rect, crs)

    # =============================================================================================== run
    def run(self) -> Optional[RefineTask]:
        """Start a run with the panel's choices (the Run button); returns the task, or None with a message."""
        if self.is_running():
            return None
        try:
            layer_name, spec = self._spec()
        except DockError as exc:
            self._message(str(exc), Qgis.Warning)
            return None
        except JobError as exc:
            self._message(self._failure_text(exc), Qgis.Warning)
            return None
        task = RefineTask(self.manager, spec, layer_name, on_done=self._task_done)
        task.progressChanged.connect(self._task_progress)
        task.statusChanged.connect(self.statusLabel.setText)
        self.task = task
        self.progressBar.setValue(0)
        self.statusLabel.setText(tr("Starting…"))
        self._update_state()
        QgsApplication.taskManager().addTask(task)
        return task

    def _spec(self) -> tuple[str, JobSpec]:
        """(the raster's name, the run) from the panel's choices, read in the main thread."""
        self.settings = config.UserSettings.load()
        layer = self.layerCombo.currentLayer()
        if not isinstance(layer, QgsRasterLayer):
            raise DockError(tr("Choose a raster layer to refine."))
        source = inputs.describe(layer, "input")
        coarse = None
        if self.coarseSourceCombo.currentData() == "layer":
            coarse_layer = self.coarseLayerCombo.currentLayer()
            if not isinstance(coarse_layer, QgsRasterLayer):
                raise DockError(tr("Choose the class layer to use as the coarse map, or pick 'Bundled model'."))
            if coarse_layer.id() == layer.id():
                raise DockError(tr("The class layer must be a class map, not the image itself."))
            coarse = inputs.describe(coarse_layer, "coarse")
        extent = self.requested_extent(layer)
        model_path = config.model_file(self.settings.model)
        if model_path is None:
            raise DockError(tr("The model '{model}' is not installed: choose a bundled model or an existing "
                               ".safetensors file in Settings….").format(model=self.settings.model))
        card = config.read_model_card(model_path)
        folder = self.settings.results_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DockError(tr("Cannot create the results folder {folder} ({reason}): choose another one in "
                               "Settings….").format(folder=folder, reason=exc)) from exc
        stem = f"{_safe_name(layer.name())}_{time.strftime('%Y%m%d-%H%M%S')}"
        spec = JobSpec(
            mode="refine",
            input=source,
            output=_unique(folder / f"{stem}_refined.tif"),
            coarse=coarse,
            extent=extent,
            model=self.settings.job_model(),
            device=self.settings.device,
            precision=config.precision_field(self.settings.precision),
            bands=self.band_mapping(),
            steps=None if self.stepsSpin.value() == config.MODEL_DEFAULT else self.stepsSpin.value(),
            band=config.rule_field(self.bandSpin.value()),
            vocabulary=config.rule_field(self.vocabularySpin.value()),
            min_confidence=config.confidence_field(self.minConfidenceSpin.value()),
            confidence=_unique(folder / f"{stem}_confidence.tif") if self.showConfidenceCheck.isChecked() else None,
            pixel_size=config.pixel_size_field(self.settings.pixel_size),
            copy_pixel_size_m=float(card.get("pixel_size_m") or 0.5),
            coarse_output=None if coarse is not None else _unique(folder / f"{stem}_coarse.tif"),
            changes=_unique(folder / f"{stem}_changes.tif") if self.showChangesCheck.isChecked() else None,
            transform_context=QgsProject.instance().transformContext(),
        )
        return layer.name(), spec

    def cancel(self) -> None:
        """Cancel the running task (the Cancel button); the backend job stops and leaves no output."""
        if self.task is not None:
            self.statusLabel.setText(tr("Cancelling…"))
            self.task.cancel()

    def _task_progress(self, value: float) -> None:
        self.progressBar.setValue(int(value))

    def _task_done(self, task: RefineTask) -> None:
        if not self._alive:
            return
        if task is self.task:
            self.task = None
        self._update_state()
        if task.cancelled:
            self.progressBar.setValue(0)
            self._finish(False, tr("Cancelled: no layer was added."), Qgis.Info)
            return
        if task.error is not None or task.result is None:
            error = task.error or JobError(tr("The run ended without a result."))
            self.progressBar.setValue(0)
            self.setupButton.setVisible(error.setup_needed)
            self._finish(False, self._failure_text(error), Qgis.Critical)
            return
        try:
            refined = self._add_result(task, task.result)
        except DockError as exc:
            self._finish(False, str(exc), Qgis.Critical)
            return
        self.progressBar.setValue(100)
        for note in task.result.notes:
            self._message(note, Qgis.Info)
        text = tr("Added '{name}' in {seconds:.1f} s.").format(name=refined.name(), seconds=task.result.seconds)
        if task.result.device:
            text = tr("Added '{name}' in {seconds:.1f} s on {device}.").format(
                name=refined.name(), seconds=task.result.seconds, device=task.result.device)
        self._finish(True, text, Qgis.Success)
        self.resultAdded.emit(refined.id())

    @staticmethod
    def _failure_text(error: JobError) -> str:
        labels = {field: tr(label) for field, label in FIELD_LABELS.items()}
        return user_message(error, labels, tr("(check '{name}')"))

    def _finish(self, ok: bool, message: str, level: Qgis.MessageLevel) -> None:
        self.statusLabel.setText(message)
        self._message(message, level)
        self.runFinished.emit(ok, message)

    # ============================================================================================ result
    def _add_result(self, task: RefineTask, result: JobResult) -> QgsRasterLayer:
        """Load the refined map into one group, with the confidence and the changed pixels above it when asked
        for and the coarse map below it, hidden; all valid or none added."""
        name = task.layer_name
        model = result.model or self.settings.model
        refined = QgsRasterLayer(str(result.output), result_name(name, tr("refined"), model), "gdal")
        confidence = changes = coarse = None
        if result.confidence is not None:
            confidence = QgsRasterLayer(str(result.confidence), result_name(name, tr("confidence"), model), "gdal")
        if result.changes is not None:
            changes = QgsRasterLayer(str(result.changes), result_name(name, tr("changed pixels"), model), "gdal")
        if result.coarse is not None:
            # The model's own coarse map, or the user's class layer (named after it).
            source = model if task.spec.coarse is None else task.spec.coarse.name
            coarse = QgsRasterLayer(str(result.coarse), result_name(name, tr("coarse"), source), "gdal")
        layers = [lyr for lyr in (confidence, changes, refined, coarse) if lyr is not None]
        broken = [lyr for lyr in layers if not lyr.isValid()]
        if broken:
            raise DockError(tr("QGIS cannot open the result {path}: check free disk space and the results folder "
                               "in Settings…, then run again.").format(path=broken[0].source()))
        classes = result.classes or self._card().get("classes") or []
        for layer in (refined, coarse):
            if layer is None:
                continue
            try:
                apply_class_style(layer, classes or classes_from_color_table(layer))
            except ValueError as exc:
                self._message(tr("The result is not styled ({reason}); it keeps its own colour table.").format(
                    reason=exc), Qgis.Warning)
        if confidence is not None:
            # Clear where the refiner was sure, red where it was not, over the class map.
            apply_confidence_style(confidence)
        if changes is not None:
            apply_changes_style(changes, tr("changed by the refiner"))
        project = QgsProject.instance()
        group = project.layerTreeRoot().insertGroup(0, tr("{name} — IDGBR").format(name=name))
        self._adding_results = True
        try:
            for layer in layers:
                project.addMapLayer(layer, False)
                node = group.addLayer(layer)
                if layer is coarse:
                    node.setItemVisibilityChecked(False)  # for comparison: switch it on to see the coarse map
        finally:
            self._adding_results = False
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
        self.deviceLabel.setText(tr("Device: starting the backend…"))
        self.checkButton.setEnabled(False)
        task = QgsTask.fromFunction(tr("IDGBR: checking the backend"), _health, self.manager,
                                    on_finished=self._health_done)
        self._health_task = task
        QgsApplication.taskManager().addTask(task)

    def _health_done(self, exception: Optional[BaseException], result: Any = None) -> None:
        self._health_task = None
        if not self._alive:
            return
        self.checkButton.setEnabled(True)
        if exception is not None:
            # No interpreter, or one that cannot start the backend: the setup is the fix for both.
            self.setupButton.setVisible(isinstance(exception, (BackendUnavailable, BackendError)))
            self.deviceLabel.setText(tr("Device: backend unavailable"))
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
        with contextlib.suppress(TypeError, RuntimeError):
            QgsProject.instance().layersAdded.disconnect(self._layers_added)


def _health(task: QgsTask, manager: Any) -> Dict[str, Any]:
    """Worker thread: a live client (starting the service if needed) and its /health."""
    return manager.client().health()


def _off_text() -> str:
    """How a rule that is switched off reads in its spin box."""
    return tr("Off")


def _default_text(sampler: Dict[str, Any], key: str, unit: str = "") -> str:
    """"Model default (8 px)" from the card's sampler section; "Off" for a rule the card switches off."""
    if key not in sampler:
        return tr("Model default")
    try:
        value = float(sampler[key])
    except (TypeError, ValueError):
        return tr("Model default")
    off = (key == "min_confidence" and value <= 0) or (key in ("band", "vocabulary") and value < 0)
    return tr("Model default ({value})").format(value=_off_text().lower() if off else f"{value:g}{unit}")


def _project_rasters() -> List[QgsRasterLayer]:
    """The project's raster layers in the order of the layers panel."""
    nodes = QgsProject.instance().layerTreeRoot().findLayers()
    return [node.layer() for node in nodes if isinstance(node.layer(), QgsRasterLayer)]


def _looks_like_image(layer: Optional[QgsMapLayer]) -> bool:
    """A raster the model can read as it is: three bands or more (red, green, blue)."""
    return isinstance(layer, QgsRasterLayer) and layer.isValid() and layer.bandCount() >= MODEL_BANDS


_INTEGER_TYPES = (Qgis.Byte, Qgis.UInt16, Qgis.Int16, Qgis.UInt32, Qgis.Int32)


def _looks_like_classes(layer: Optional[QgsMapLayer]) -> bool:
    """A class map: one band of integers, or drawn with a palette."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid() or layer.bandCount() != 1:
        return False
    return (isinstance(layer.renderer(), QgsPalettedRasterRenderer)
            or layer.dataProvider().dataType(1) in _INTEGER_TYPES)


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.-]+", "_", name, flags=re.UNICODE).strip("._")
    return cleaned[:60] or "raster"


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        n += 1
    return candidate
