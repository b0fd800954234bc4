"""IDGBR settings: backend interpreter, device, model, steps, results folder, and a "Test backend" button;
the remote backend (URL, token, CA certificate) with its own "Test".

"Test backend" starts a service with the interpreter in the field (its own, in a temporary state folder,
stopped afterwards) and shows its torch version, device and GPU name, without touching the session's
service or the saved settings. The remote "Test" contacts the service with the values as typed, in a
background task, and shows its version, device and GPU.
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
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..backend_client import BackendError
from ..backend_process import ENV_PYTHON, SETTINGS_PYTHON, BackendManager, BackendUnavailable, find_python
from ..i18n import tr
from ..jobs.spec import precision_choices
from ..remote_config import RemoteSettings, pasted_token_file, save_token
from . import config
from .device import describe_device

OTHER_MODEL = "__other__"


class SettingsDialog(QDialog):
    """Edit and persist the IDGBR settings (QgsSettings)."""

    #: (success, text) when a backend test ends
    testFinished = pyqtSignal(bool, str)
    #: (success, text) when a remote backend test ends
    remoteTestFinished = pyqtSignal(bool, str)

    def __init__(self, backend_manager: Any = None, parent: Optional[QWidget] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(tr("IDGBR settings"))
        self.setMinimumWidth(640)
        self.manager = backend_manager
        self._test_task: Optional[QgsTask] = None
        self._remote_task: Optional[QgsTask] = None
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
        self.pixelSizeSpin.setRange(0.0, config.MAX_PIXEL_SIZE_M)
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
        layout.addWidget(self._build_remote_group())

        self.buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, parent=self)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout.addWidget(self.buttons)

        self.modelCombo.currentIndexChanged.connect(self._update_enabled)
        self.testButton.clicked.connect(self.test_backend)
        self.setupButton.clicked.connect(self.open_setup)
        self.pythonWidget.fileChanged.connect(lambda _p: self._show_python_source())

    def _build_remote_group(self) -> QGroupBox:
        group = QGroupBox(tr("Remote backend"), self)
        box = QVBoxLayout(group)
        self.remoteCheck = QCheckBox(tr("Use a remote backend"), group)
        self.remoteCheck.setToolTip(tr("Run on an 'idgbr serve' on another computer, e.g. a GPU server: the toolbox "
                                       "and the panel send their rasters there and get the results back, instead "
                                       "of running the backend on this computer."))
        box.addWidget(self.remoteCheck)
        form = QFormLayout()
        self.remoteUrlEdit = QLineEdit(group)
        self.remoteUrlEdit.setPlaceholderText("https://gpu-server:8443")
        self.remoteUrlEdit.setToolTip(tr("The address of the service: https://, its host name or address, and the "
                                         "port it was started with (idgbr serve --port)."))
        form.addRow(tr("URL"), self.remoteUrlEdit)
        self.remoteTokenFile = QgsFileWidget(group)
        self.remoteTokenFile.setStorageMode(QgsFileWidget.GetFile)
        self.remoteTokenFile.setDialogTitle(tr("Copy of the service's token file"))
        self.remoteTokenFile.setToolTip(tr("A copy of the file the service's --token-file names. Only this path is "
                                           "saved in the settings, not the token."))
        form.addRow(tr("Token file"), self.remoteTokenFile)
        self.remoteTokenEdit = QLineEdit(group)
        self.remoteTokenEdit.setEchoMode(QLineEdit.Password)
        self.remoteTokenEdit.setPlaceholderText(tr("or paste the token here"))
        self.remoteTokenEdit.setToolTip(tr("A pasted token is saved to {file}, readable only by you, and that file "
                                           "is used as the token file. Choosing a copy of the token file is "
                                           "safer: the token never passes the clipboard.").format(
            file=pasted_token_file()))
        form.addRow(tr("Token"), self.remoteTokenEdit)
        self.remoteCaFile = QgsFileWidget(group)
        self.remoteCaFile.setStorageMode(QgsFileWidget.GetFile)
        self.remoteCaFile.setFilter(tr("Certificates (*.crt *.pem *.cer);;All files (*)"))
        self.remoteCaFile.setDialogTitle(tr("The service's certificate"))
        self.remoteCaFile.setToolTip(tr("Optional: for a self-signed certificate, a copy of the service's "
                                        "--tls-cert file (or the CA certificate that signed it). Empty: the "
                                        "certificates this computer trusts."))
        form.addRow(tr("CA certificate (optional)"), self.remoteCaFile)
        box.addLayout(form)
        row = QHBoxLayout()
        self.remoteTestButton = QPushButton(tr("Test"), group)
        self.remoteTestButton.setToolTip(tr("Contact the remote backend with these values and report its version, "
                                            "device and GPU."))
        row.addWidget(self.remoteTestButton)
        row.addStretch(1)
        box.addLayout(row)
        self.remoteTestLabel = QLabel("", group)
        self.remoteTestLabel.setWordWrap(True)
        self.remoteTestLabel.setTextInteractionFlags(Qt.TextSelectableByMouse)
        box.addWidget(self.remoteTestLabel)
        self.remoteTestButton.clicked.connect(self.test_remote)
        return group

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
        remote = RemoteSettings.load(QgsSettings())
        self.remoteCheck.setChecked(remote.enabled)
        self.remoteUrlEdit.setText(remote.url)
        self.remoteTokenFile.setFilePath(remote.token_file)
        self.remoteTokenEdit.clear()
        self.remoteCaFile.setFilePath(remote.ca_file)
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

    def remote_settings(self) -> RemoteSettings:
        """The remote backend as entered (a pasted token is not part of it: see `remote_token`)."""
        return RemoteSettings(enabled=self.remoteCheck.isChecked(), url=self.remoteUrlEdit.text().strip(),
                              token_file=self.remoteTokenFile.filePath().strip(),
                              ca_file=self.remoteCaFile.filePath().strip())

    def remote_token(self) -> str:
        return self.remoteTokenEdit.text().strip()

    def validate(self) -> Optional[str]:
        """Why the values cannot be saved, or None."""
        remote = self.remote_settings()
        if remote.enabled:
            problem = remote.problem(self.remote_token())
            if problem:
                return problem
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
        self._save_remote(settings)  # first: writing a pasted token is the one step that may fail
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

    def _save_remote(self, settings: QgsSettings) -> None:
        """Store the remote backend; a pasted token goes to a private file, whose path is stored instead."""
        remote = self.remote_settings()
        token = self.remote_token()
        if token:
            remote.token_file = str(save_token(token))
            self.remoteTokenFile.setFilePath(remote.token_file)
            self.remoteTokenEdit.clear()
        remote.save(settings)
        # The session's manager compares the settings on each run and reconnects when they changed.

    def accept(self) -> None:
        problem = self.validate()
        if problem:
            self.testLabel.setText(problem)
            return
        try:
            self.save()
        except OSError as exc:  # only the pasted token's file is written here
            self.testLabel.setText(tr("Cannot save the token to {file} ({reason}): choose a copy of the service's "
                                      "token file instead.").format(file=pasted_token_file(),
                                                                    reason=exc.strerror or exc))
            return
        self._stop()
        super().accept()

    def reject(self) -> None:
        self._stop()
        super().reject()

    def _stop(self) -> None:
        self._alive = False
        for task in (self._test_task, self._remote_task):
            if task is not None:
                task.cancel()

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

    def test_remote(self) -> None:
        """Contact the remote backend as entered (not saved) in a background task; report version, device, GPU."""
        if self._remote_task is not None:
            return
        remote = self.remote_settings()
        problem = remote.problem(self.remote_token())
        if problem:
            self._remote_done(None, None, problem)
            return
        try:
            client = remote.client(self.remote_token() or None)
        except BackendError as exc:  # a CA file that is no certificate, a token file without a token
            self._remote_done(exc, None)
            return
        self.remoteTestButton.setEnabled(False)
        self.remoteTestLabel.setText(tr("Contacting {url}…").format(url=client.base_url))
        task = QgsTask.fromFunction(tr("IDGBR: testing the remote backend"), _test_remote, client,
                                    on_finished=self._remote_done)
        self._remote_task = task
        QgsApplication.taskManager().addTask(task)

    def _remote_done(self, exception: Optional[BaseException], result: Optional[Dict[str, Any]] = None,
                     problem: Optional[str] = None) -> None:
        self._remote_task = None
        if not self._alive:
            return
        self.remoteTestButton.setEnabled(True)
        if exception is not None or problem is not None:
            text = tr("Test failed: {reason}").format(reason=problem or exception)
            self.remoteTestLabel.setText(text)
            self.remoteTestFinished.emit(False, text)
            return
        text = describe_remote_health(result or {})
        self.remoteTestLabel.setText(text)
        self.remoteTestFinished.emit(True, text)

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


def describe_remote_health(health: Dict[str, Any]) -> str:
    """A remote backend's version, address, device and GPU from its `/health` (the panel's device words)."""
    url = str(health.get("remote_url") or "")
    label, _tip = describe_device({key: value for key, value in health.items() if key != "remote_url"})
    device = str(health.get("device") or "cpu")
    lines = [
        tr("Remote backend OK: IDGBR {version} at {url}.").format(version=health.get("version") or "?", url=url),
        label,
        tr("GPU: {name}").format(name=health.get("device_name") or ("—" if device == "cpu" else device)),
        f"torch {health.get('torch') or '?'}" + (f" (CUDA {health['torch_cuda']})" if health.get("torch_cuda") else ""),
    ]
    if url.startswith("http://"):
        lines.append(tr("Warning: plain HTTP: the token and your rasters cross the network unencrypted. Start the "
                        "service with --tls-cert and --tls-key and use https://."))
    return "\n".join(lines)


def _test_remote(task: QgsTask, client: Any) -> Dict[str, Any]:
    """Worker thread: the remote service's /health (a BackendError says what to change)."""
    return client.health()


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
