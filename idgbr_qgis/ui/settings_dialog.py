"""IDGBR settings: backend interpreter, device, model, steps, results folder, and a "Test backend" button.

"Test backend" starts a service with the interpreter in the field (its own, in a temporary state folder,
stopped afterwards) and shows its torch version, device and GPU name, without touching the session's
service or the saved settings.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

from qgis.core import QgsApplication, QgsSettings, QgsTask
from qgis.gui import QgsDoubleSpinBox, QgsFileWidget, QgsSpinBox
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..backend_process import ENV_PYTHON, SETTINGS_PYTHON, BackendManager, BackendUnavailable, find_python
from ..i18n import tr
from ..jobs.spec import precision_choices
from . import config

OTHER_MODEL = "__other__"


class SettingsDialog(QDialog):
    """Edit and persist the IDGBR settings (QgsSettings)."""

    #: (success, text) when a backend test ends
    testFinished = pyqtSignal(bool, str)

    def __init__(self, backend_manager: Any = None, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(tr("IDGBR settings"))
        self.setMinimumWidth(640)
        self.manager = backend_manager
        self._test_task: Optional[QgsTask] = None
        self._alive = True
        self._build_ui()
        self._load()

    # ------------------------------------------------------------------------------------------ layout
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        form = QFormLayout()
        python_row = QHBoxLayout()
        python_row.addWidget(QLabel(tr("Backend Python")))
        self.pythonWidget = QgsFileWidget(self)
        self.pythonWidget.setStorageMode(QgsFileWidget.GetFile)
        self.pythonWidget.setDialogTitle(tr("Backend Python interpreter"))
        self.pythonWidget.setToolTip(tr("The Python with PyTorch and the 'idgbr' backend. Leave empty to use the "
                                        "environment made by the first-run setup."))
        python_row.addWidget(self.pythonWidget, 1)
        self.setupButton = QPushButton(tr("Set up backend…"))
        self.setupButton.setToolTip(tr("Create a dedicated environment with PyTorch and the backend, or adopt an "
                                       "existing Python."))
        python_row.addWidget(self.setupButton)
        # Outside the form: a word-wrapped label in a form row gets clipped to one line's height.
        layout.addLayout(python_row)
        self.pythonSourceLabel = QLabel(self)
        self.pythonSourceLabel.setWordWrap(True)
        layout.addWidget(self.pythonSourceLabel)

        self.indexEdit = QLineEdit(self)
        self.indexEdit.setPlaceholderText(tr("PyTorch's index, then your pip settings"))
        self.indexEdit.setToolTip(tr("Where 'Set up backend…' downloads PyTorch and its libraries, for example your "
                                     "organisation's mirror (https://mirror.example.org/simple). Empty: PyTorch's "
                                     "own index when it can be reached, otherwise the default package index; a "
                                     "package index in your pip settings is always kept."))
        form.addRow(tr("Package index (setup)"), self.indexEdit)

        self.deviceCombo = QComboBox(self)
        for device, text in (("auto", "Automatic (GPU when available)"), ("cpu", "CPU"),
                             ("cuda", "NVIDIA GPU (CUDA)"), ("mps", "Apple GPU (MPS)")):
            self.deviceCombo.addItem(text, device)
        form.addRow(tr("Device"), self.deviceCombo)

        self.precisionCombo = QComboBox(self)
        for precision, text in precision_choices():
            self.precisionCombo.addItem(text, precision or config.PRECISION_DEFAULT)
        self.precisionCombo.setToolTip(tr("Number format of the networks. bf16 is faster on CPUs with AMX or "
                                          "AVX512-BF16 units and changes a few boundary pixels; fp16 runs on NVIDIA "
                                          "GPUs only. The refiner's rules and its confidence always use fp32."))
        form.addRow(tr("Precision (advanced)"), self.precisionCombo)

        self.modelCombo = QComboBox(self)
        for name in config.model_choices():
            card = config.read_model_card(config.bundled_models()[name])
            classes = ", ".join(str(c.get("name")) for c in card.get("classes") or [])
            self.modelCombo.addItem(f"{name} ({classes})" if classes else name, name)
        self.modelCombo.addItem(tr("Other model file…"), OTHER_MODEL)
        form.addRow(tr("Model"), self.modelCombo)
        self.modelFile = QgsFileWidget(self)
        self.modelFile.setStorageMode(QgsFileWidget.GetFile)
        self.modelFile.setFilter(tr("IDGBR model bundles (*.safetensors)"))
        form.addRow(tr("Model file"), self.modelFile)

        self.stepsSpin = QgsSpinBox(self)
        self.stepsSpin.setRange(config.MODEL_DEFAULT, config.MAX_STEPS)
        self.stepsSpin.setSpecialValueText(tr("Model default"))
        self.stepsSpin.setClearValue(config.MODEL_DEFAULT)
        form.addRow(tr("Steps"), self.stepsSpin)

        # Advanced: only for rasters without a CRS or with wrong metadata.
        self.pixelSizeSpin = QgsDoubleSpinBox(self)
        self.pixelSizeSpin.setDecimals(3)
        self.pixelSizeSpin.setSingleStep(0.05)
        self.pixelSizeSpin.setRange(0.0, config.MAX_PIXEL_SIZE)
        self.pixelSizeSpin.setSuffix(tr(" m"))
        self.pixelSizeSpin.setSpecialValueText(tr("From the layer's CRS"))
        self.pixelSizeSpin.setClearValue(0.0)
        self.pixelSizeSpin.setToolTip(tr("Advanced: the ground size of one input pixel, for rasters without a CRS or "
                                         "with wrong metadata. Outside the model's range the model works on a "
                                         "resampled copy; results are always on the layer's grid."))
        form.addRow(tr("Input pixel size (advanced)"), self.pixelSizeSpin)

        self.outputWidget = QgsFileWidget(self)
        self.outputWidget.setStorageMode(QgsFileWidget.GetDirectory)
        self.outputWidget.lineEdit().setPlaceholderText(str(config.default_output_dir()))
        self.outputWidget.setToolTip(tr("Where the dock writes its GeoTIFFs (kept, so saved projects still open)."))
        form.addRow(tr("Results folder"), self.outputWidget)
        layout.addLayout(form)

        test_row = QHBoxLayout()
        self.testButton = QPushButton(tr("Test backend"))
        self.testButton.setToolTip(tr("Start the backend with this interpreter and report torch, device and GPU."))
        test_row.addWidget(self.testButton)
        test_row.addStretch(1)
        layout.addLayout(test_row)
        self.testLabel = QLabel("")
        self.testLabel.setWordWrap(True)
        self.testLabel.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout.addWidget(self.testLabel)

        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, parent=self)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)

        self.modelCombo.currentIndexChanged.connect(self._update_enabled)
        self.testButton.clicked.connect(self.test_backend)
        self.setupButton.clicked.connect(self.open_setup)
        self.pythonWidget.fileChanged.connect(lambda _p: self._show_python_source())

    def _load(self) -> None:
        settings = config.UserSettings.load()
        self.pythonWidget.setFilePath(str(QgsSettings().value(SETTINGS_PYTHON, "") or ""))
        self.deviceCombo.setCurrentIndex(max(0, self.deviceCombo.findData(settings.device)))
        self.precisionCombo.setCurrentIndex(max(0, self.precisionCombo.findData(settings.precision)))
        index = self.modelCombo.findData(settings.model)
        if index < 0:
            self.modelCombo.setCurrentIndex(self.modelCombo.findData(OTHER_MODEL))
            self.modelFile.setFilePath(settings.model)
        else:
            self.modelCombo.setCurrentIndex(index)
        self.stepsSpin.setValue(settings.steps)
        self.pixelSizeSpin.setValue(settings.pixel_size)
        self.outputWidget.setFilePath(settings.output_dir)
        self.indexEdit.setText(settings.index_url)
        self._update_enabled()
        self._show_python_source()

    def _update_enabled(self) -> None:
        self.modelFile.setEnabled(self.modelCombo.currentData() == OTHER_MODEL)

    def _show_python_source(self) -> None:
        env = os.environ.get(ENV_PYTHON, "").strip()
        if env:
            self.pythonSourceLabel.setText(tr("The environment variable {variable} is set: {python} is used, not "
                                              "this field.").format(variable=ENV_PYTHON, python=env))
            return
        if self.python_path():
            self.pythonSourceLabel.setText("")
            return
        try:
            path, source = find_python()
            self.pythonSourceLabel.setText(tr("Empty: uses {python} ({source}).").format(python=path, source=source))
        except BackendUnavailable:
            self.pythonSourceLabel.setText(tr("No backend found yet: press 'Set up backend…'."))

    # ------------------------------------------------------------------------------------------ values
    def python_path(self) -> str:
        return self.pythonWidget.filePath().strip()

    def model_value(self) -> str:
        data = self.modelCombo.currentData()
        return self.modelFile.filePath().strip() if data == OTHER_MODEL else str(data)

    def validate(self) -> Optional[str]:
        """Why the values cannot be saved, or None."""
        python = self.python_path()
        if python and not Path(python).is_file():
            return tr("The backend Python {python} does not exist: choose the python executable, or leave it "
                      "empty.").format(python=python)
        model = self.model_value()
        if not model:
            return tr("Choose a model file (.safetensors), or a bundled model.")
        if config.model_file(model) is None:
            return tr("The model file {model} does not exist or is not a .safetensors bundle.").format(model=model)
        output = self.outputWidget.filePath().strip()
        if output and Path(output).exists() and not Path(output).is_dir():
            return tr("The results folder {folder} is a file: choose a folder.").format(folder=output)
        return config.index_url_problem(self.indexEdit.text())

    def save(self) -> None:
        settings = QgsSettings()
        old_python = str(settings.value(SETTINGS_PYTHON, "") or "")
        python = self.python_path()
        if python:
            settings.setValue(SETTINGS_PYTHON, python)
        else:
            settings.remove(SETTINGS_PYTHON)
        user = config.UserSettings.load()
        user.device = str(self.deviceCombo.currentData())
        user.precision = str(self.precisionCombo.currentData() or config.PRECISION_DEFAULT)
        user.model = self.model_value()
        user.steps = self.stepsSpin.value()
        user.pixel_size = self.pixelSizeSpin.value()
        user.output_dir = self.outputWidget.filePath().strip()
        user.index_url = self.indexEdit.text().strip()
        user.save()
        if python != old_python and self.manager is not None:
            self.manager.forget()  # the next job starts the service with the new interpreter

    def accept(self) -> None:
        problem = self.validate()
        if problem:
            self.testLabel.setText(problem)
            return
        self.save()
        self._stop()
        super().accept()

    def reject(self) -> None:
        self._stop()
        super().reject()

    def _stop(self) -> None:
        self._alive = False
        if self._test_task is not None:
            self._test_task.cancel()

    # ---------------------------------------------------------------------------------------------- test
    def test_backend(self) -> None:
        """Start a backend with the interpreter in the field and report torch, device and GPU (background)."""
        if self._test_task is not None:
            return
        python = self.python_path()
        try:
            path = Path(python) if python else find_python()[0]
        except BackendUnavailable as exc:
            self._test_done(exc, None)
            return
        if not path.is_file():
            self._test_done(BackendUnavailable(tr("{python} does not exist: choose the python executable.").format(
                python=path)), None)
            return
        self.testButton.setEnabled(False)
        self.testLabel.setText(tr("Testing {python} (starting PyTorch can take a while)…").format(python=path))
        task = QgsTask.fromFunction(tr("IDGBR: testing the backend"), _test, path, self.manager,
                                    on_finished=self._test_done)
        self._test_task = task
        QgsApplication.taskManager().addTask(task)

    def _test_done(self, exception: Optional[BaseException], result: Optional[Dict[str, Any]] = None) -> None:
        self._test_task = None
        if not self._alive:
            return
        self.testButton.setEnabled(True)
        if exception is not None:
            text = tr("Test failed: {reason}").format(reason=exception)
            self.testLabel.setText(text)
            self.testFinished.emit(False, text)
            return
        text = describe_health(result or {})
        self.testLabel.setText(text)
        self.testFinished.emit(True, text)

    def open_setup(self) -> None:
        from .setup_dialog import SetupDialog

        problem = config.index_url_problem(self.indexEdit.text())
        if problem:
            self.testLabel.setText(problem)
            return
        # The index as typed here, saved or not yet.
        dialog = SetupDialog(self, self.manager, index_url=self.indexEdit.text())
        dialog.backendReady.connect(self.pythonWidget.setFilePath)
        dialog.exec_()


def describe_health(health: Dict[str, Any]) -> str:
    """torch version, device and GPU name from `/health`, in one readable block."""
    device = str(health.get("device") or "cpu")
    name = health.get("device_name") or ("—" if device == "cpu" else device)
    lines = [
        tr("Backend OK."),
        f"torch {health.get('torch') or '?'}" + (f" (CUDA {health['torch_cuda']})" if health.get("torch_cuda") else ""),
        tr("Device: {device}").format(device=device.upper() if device != "mps" else "MPS"),
        tr("GPU: {name}").format(name=name),
    ]
    if device == "cpu" and health.get("device_reason"):
        lines.append(tr("Why CPU: {reason}").format(reason=health["device_reason"]))
    if health.get("python"):
        lines.append(tr("Python: {python}").format(python=health["python"]))
    return "\n".join(lines)


def _test(task: QgsTask, python: Path, session: Any) -> Dict[str, Any]:
    """Worker thread: /health of the session's service when it uses `python`, else of a throw-away one."""
    current = getattr(session, "python", None)
    if session is not None and current is not None and _same(Path(current), python):
        return session.client().health()
    state = Path(tempfile.mkdtemp(prefix="idgbr_test_"))
    manager = BackendManager(state_dir=state, timeout=120.0, locate=lambda: (python, "the settings dialog"))
    try:
        return manager.client().health()
    finally:
        manager.shutdown()
        shutil.rmtree(state, ignore_errors=True)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
