"""First-run setup dialog: create the backend environment (venv + PyTorch + backend) or adopt an existing Python.

The commands come from `setup_env`; they run one after another in QProcess, so QGIS stays responsive,
the pip log streams into the dialog and Cancel kills the running command at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import quote

from qgis.core import Qgis, QgsApplication, QgsMessageLog, QgsSettings
from qgis.gui import QgsFileWidget
from qgis.PyQt.QtCore import QProcess, QProcessEnvironment, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QButtonGroup,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QGridLayout,
    QLabel,
    QMessageBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from .. import setup_env
from ..backend_process import SETTINGS_PYTHON
from ..i18n import tr
from ..setup_env import InstallPlan, SetupError
from . import config

LOG_TAG = "IDGBR"
_PROGRESS_LINES = ("Collecting", "Downloading", "Installing", "Building", "Successfully", "Requirement already")


def qgis_proxy_url(settings: Optional[QgsSettings] = None) -> Optional[str]:
    """QGIS's HTTP proxy (Settings › Options › Network) as a URL for pip, or None when none is set."""
    settings = settings or QgsSettings()
    enabled = str(settings.value("proxy/proxyEnabled", False)).lower() in ("true", "1")
    kind = str(settings.value("proxy/proxyType", "") or "")
    host = str(settings.value("proxy/proxyHost", "") or "").strip()
    if not enabled or not host or kind not in ("HttpProxy", "HttpCachingProxy"):
        return None  # DefaultProxy: the system's settings reach pip through the environment already
    port = str(settings.value("proxy/proxyPort", "") or "").strip()
    user = str(settings.value("proxy/proxyUser", "") or "")
    password = str(settings.value("proxy/proxyPassword", "") or "")
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else ""
    return f"http://{auth}{host}{':' + port if port else ''}"


class SetupDialog(QDialog):
    """Set up the backend Python; on success stores it in the setting BackendManager reads."""

    #: the interpreter now configured for the backend
    backendReady = pyqtSignal(str)
    #: (success, message) at the end of every attempt, including cancel
    attemptFinished = pyqtSignal(bool, str)

    def __init__(self, parent: Optional[QWidget] = None, backend_manager: object = None,
                 profile_dir: Optional[Path] = None, index_url: Optional[str] = None) -> None:
        super().__init__(parent)
        self.setWindowTitle(tr("IDGBR — set up the backend"))
        self.setMinimumWidth(620)
        self._manager = backend_manager
        # The package index from Settings (None: the saved one); empty means PyTorch's and pip's defaults.
        self._index_url = config.UserSettings.load().index_url if index_url is None else index_url.strip()
        self._profile = Path(profile_dir or QgsApplication.qgisSettingsDirPath())
        self._venv = setup_env.venv_dir(self._profile)
        self._plan: Optional[InstallPlan] = None
        self._index = 0
        self._done_weight = 0
        self._step_lines = 0
        self._step_log: list[str] = []
        self._process: Optional[QProcess] = None
        self._cancelled = False
        self._check_output: list[str] = []
        self._build_ui()
        self._set_running(False)

    # ------------------------------------------------------------------------------------------ layout
    def _build_ui(self) -> None:
        layout = QVBoxLayout(self)
        intro = QLabel(
            tr("IDGBR runs its models with PyTorch in a separate Python, so QGIS's own Python is never changed. "
               "Create a dedicated environment (downloads PyTorch, about 200 MB for the CPU build and 2.5 GB "
               "for the CUDA build), or use a Python where PyTorch is already installed.")
        )
        intro.setWordWrap(True)
        layout.addWidget(intro)

        grid = QGridLayout()
        self.createRadio = QRadioButton(tr("Create a dedicated environment (recommended)"))
        self.existingRadio = QRadioButton(tr("Use an existing Python with PyTorch"))
        self._choice = QButtonGroup(self)
        self._choice.addButton(self.createRadio)
        self._choice.addButton(self.existingRadio)
        self.createRadio.setChecked(True)
        grid.addWidget(self.createRadio, 0, 0, 1, 2)
        self.venvLabel = QLabel(tr("Folder: {folder}").format(folder=self._venv))
        self.venvLabel.setWordWrap(True)
        grid.addWidget(self.venvLabel, 1, 1)
        grid.addWidget(QLabel(tr("PyTorch build:")), 2, 0)
        self.buildCombo = QComboBox()
        self.buildCombo.addItem(tr("CPU"), False)
        self.buildCombo.addItem(tr("CUDA 12.1 (NVIDIA GPU)"), True)
        grid.addWidget(self.buildCombo, 2, 1)
        grid.addWidget(self.existingRadio, 3, 0, 1, 2)
        self.pythonWidget = QgsFileWidget()
        self.pythonWidget.setStorageMode(QgsFileWidget.GetFile)
        self.pythonWidget.setDialogTitle(tr("Python interpreter with PyTorch"))
        grid.addWidget(QLabel(tr("Python:")), 4, 0)
        grid.addWidget(self.pythonWidget, 4, 1)
        grid.setColumnStretch(1, 1)
        layout.addLayout(grid)

        self.statusLabel = QLabel("")
        self.statusLabel.setWordWrap(True)
        layout.addWidget(self.statusLabel)
        self.progressBar = QProgressBar()
        self.progressBar.setRange(0, 1000)
        self.progressBar.setValue(0)
        layout.addWidget(self.progressBar)
        self.logView = QPlainTextEdit()
        self.logView.setReadOnly(True)
        self.logView.setMaximumBlockCount(5000)
        self.logView.setPlaceholderText(tr("The installation log appears here."))
        layout.addWidget(self.logView, 1)

        self.buttons = QDialogButtonBox()
        self.startButton = QPushButton(tr("Start"))
        self.cancelButton = QPushButton(tr("Cancel"))
        self.closeButton = QPushButton(tr("Close"))
        self.buttons.addButton(self.startButton, QDialogButtonBox.ActionRole)
        self.buttons.addButton(self.cancelButton, QDialogButtonBox.ActionRole)
        self.buttons.addButton(self.closeButton, QDialogButtonBox.RejectRole)
        self.startButton.clicked.connect(self.start)
        self.cancelButton.clicked.connect(self.cancel)
        self.closeButton.clicked.connect(self.reject)
        layout.addWidget(self.buttons)
        self.createRadio.toggled.connect(self._update_enabled)
        self._detect_gpu()

    def _detect_gpu(self) -> None:
        gpu = setup_env.has_nvidia_gpu()
        self.buildCombo.setCurrentIndex(1 if gpu else 0)
        self.buildCombo.setToolTip(
            tr("An NVIDIA GPU was found (nvidia-smi): the CUDA build uses it.") if gpu
            else tr("No NVIDIA GPU was found (no nvidia-smi): the CPU build is the right one.")
        )

    def _update_enabled(self) -> None:
        running = self.is_running()
        create = self.createRadio.isChecked()
        self.createRadio.setEnabled(not running)
        self.existingRadio.setEnabled(not running)
        self.buildCombo.setEnabled(not running and create)
        self.pythonWidget.setEnabled(not running and not create)

    def _set_running(self, running: bool) -> None:
        self.startButton.setEnabled(not running)
        self.cancelButton.setEnabled(running)
        self.closeButton.setEnabled(not running)
        self._update_enabled()

    # ------------------------------------------------------------------------------------------ public
    def is_running(self) -> bool:
        return self._process is not None

    def start(self) -> None:
        """Start the chosen kind of setup (the Start button)."""
        if self.createRadio.isChecked():
            self.start_create(bool(self.buildCombo.currentData()))
        else:
            self.start_existing(Path(self.pythonWidget.filePath().strip()) if self.pythonWidget.filePath() else None)

    def start_create(self, cuda: bool) -> None:
        """Create the dedicated environment in the profile folder."""
        if self.is_running():
            return
        self.logView.clear()
        self._plan = None
        try:
            base = setup_env.find_base_python()
            source = setup_env.backend_source_dir()
            self._venv.parent.mkdir(parents=True, exist_ok=True)
            setup_env.check_disk_space(self._venv.parent, cuda)
            plan = setup_env.plan_install(base, self._venv, source, cuda, index_url=self._index_url,
                                          proxy_url=qgis_proxy_url())
        except (SetupError, OSError) as exc:
            self._finish(False, str(exc))
            return
        self._log(f"Using Python {base.version_text} at {base.path} to create {self._venv}")
        for note in plan.notes:
            self._log(note)
        self._run(plan)

    def start_existing(self, python: Optional[Path]) -> None:
        """Adopt an existing interpreter: check it, and offer to add the backend when only torch is there."""
        if self.is_running():
            return
        self.logView.clear()
        self._plan = None
        if python is None or not str(python):
            self._finish(False, tr("Choose the Python interpreter (python.exe on Windows) that has PyTorch."))
            return
        try:
            info = setup_env.probe_python(python)
            why = info.incompatibility()
            if why:
                raise SetupError(why)
            if not info.has_torch:
                raise SetupError(tr(
                    "Python {version} at {python} has no PyTorch. Choose 'Create a dedicated environment', or "
                    "install PyTorch into that Python first (pytorch.org › Get started)."
                ).format(version=info.version_text, python=python))
            if info.has_idgbr:
                plan = InstallPlan(base_python=info, venv=python.parent, python=python, cuda=False,
                                   backend_source=Path(), steps=[setup_env.Step(
                                       "Checking the backend", str(python), setup_env.verify_arguments())])
            else:
                source = setup_env.backend_source_dir()
                answer = QMessageBox.question(
                    self, tr("IDGBR"),
                    tr("{python} has PyTorch but not the IDGBR backend. Install the backend and its libraries "
                       "(numpy, rasterio, …) into that Python with pip? Its PyTorch is kept.").format(python=python),
                )
                if answer != QMessageBox.Yes:
                    raise SetupError(tr("Nothing was installed. Choose 'Create a dedicated environment' instead."))
                plan = setup_env.plan_backend_into(info, source, self._index_url)
        except SetupError as exc:
            self._finish(False, str(exc))
            return
        self._run(plan)

    def cancel(self) -> None:
        """Stop the running command at once; nothing is recorded in the settings."""
        if self._process is None:
            return
        self._cancelled = True
        self._log("Cancelling…")
        self._process.kill()

    # ------------------------------------------------------------------------------------------- steps
    def _run(self, plan: InstallPlan) -> None:
        self._plan = plan
        self._index = 0
        self._done_weight = 0
        self._cancelled = False
        self._check_output = []
        self.progressBar.setValue(0)
        if plan.dedicated:
            # The environment is rebuilt: until its check passes it must not count as a backend.
            try:
                setup_env.unmark(plan.venv)
            except OSError as exc:
                self._finish(False, tr("The environment {venv} cannot be rebuilt ({reason}). Close the programs "
                                       "that use it, then start the setup again.").format(venv=plan.venv, reason=exc))
                return
        self._next_step()

    def _next_step(self) -> None:
        assert self._plan is not None
        if self._index >= len(self._plan.steps):
            self._succeeded()
            return
        step = self._plan.steps[self._index]
        self.statusLabel.setText(tr("Step {n} of {count}: {title}…").format(n=self._index + 1,
                                                                            count=len(self._plan.steps),
                                                                            title=step.title))
        self._log(f"\n== {step.title}\n$ {step.command_line()}")
        self._step_lines = 0
        self._step_log = []
        process = QProcess(self)
        process.setProcessChannelMode(QProcess.MergedChannels)
        environment = QProcessEnvironment()
        for key, value in setup_env.child_environment(qgis_proxy_url()).items():
            environment.insert(key, value)
        process.setProcessEnvironment(environment)
        process.readyReadStandardOutput.connect(self._read_output)
        process.finished.connect(self._step_finished)
        process.errorOccurred.connect(self._process_error)
        self._process = process
        self._set_running(True)
        process.start(step.program, step.arguments)

    def _read_output(self) -> None:
        if self._process is None:
            return
        text = bytes(self._process.readAllStandardOutput()).decode("utf-8", errors="replace")
        for line in text.splitlines():
            self._step_log.append(line)
            self.logView.appendPlainText(line)
            if line.startswith(_PROGRESS_LINES):
                self._step_lines += 1
        self._show_progress()

    def _show_progress(self) -> None:
        if self._plan is None:
            return
        step = self._plan.steps[min(self._index, len(self._plan.steps) - 1)]
        # pip does not say how much is left: creep towards the step's end as packages come in.
        within = min(0.95, 1 - 0.85**self._step_lines)
        value = (self._done_weight + within * step.weight) / self._plan.total_weight
        self.progressBar.setValue(int(1000 * value))

    def _process_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.FailedToStart and self._process is not None:
            program = self._process.program()
            self._teardown_process()
            self._finish(False, tr("{program} could not be started ({reason}). Check that the file exists and "
                                   "that antivirus software allows it, then retry.").format(
                program=program, reason=self._process_error_text(error)))

    @staticmethod
    def _process_error_text(error: QProcess.ProcessError) -> str:
        return {QProcess.FailedToStart: tr("missing file or no permission to run it")}.get(error, str(int(error)))

    def _step_finished(self, exit_code: int, exit_status: QProcess.ExitStatus) -> None:
        self._read_output()
        self._teardown_process()
        assert self._plan is not None
        step = self._plan.steps[self._index]
        if self._cancelled:
            self._finish(False, tr("Setup cancelled; the backend setting was not changed. Start again to retry."))
            return
        log = "\n".join(self._step_log)
        if exit_status != QProcess.NormalExit or exit_code != 0:
            if step.optional:
                self._log(f"(optional step failed, going on: exit code {exit_code})")
            else:
                advice = setup_env.explain_failure(log, exit_code)
                self._finish(False, tr("'{title}' failed. {advice}").format(title=step.title, advice=advice))
                return
        if self._index == len(self._plan.steps) - 1:
            self._check_output = list(self._step_log)
        self._done_weight += step.weight
        self._index += 1
        self._show_progress()
        self._next_step()

    def _teardown_process(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.deleteLater()

    def _succeeded(self) -> None:
        assert self._plan is not None
        try:
            check = setup_env.parse_verify_output(self._plan.python, "\n".join(self._check_output))
            if self._plan.dedicated:
                setup_env.mark_complete(self._plan.venv, check)
        except (SetupError, ValueError) as exc:
            self._finish(False, str(exc))
            return
        except OSError as exc:
            self._finish(False, tr("The environment works but could not be marked as complete ({reason}). Check "
                                   "the permissions of the QGIS profile folder, then start the setup again.").format(
                reason=exc))
            return
        QgsSettings().setValue(SETTINGS_PYTHON, str(self._plan.python))
        forget = getattr(self._manager, "forget", None)
        if callable(forget):
            forget()  # the next job starts the service with the new interpreter
        self.progressBar.setValue(1000)
        self._finish(True, tr("The backend is ready: PyTorch {torch} on {device}, Python {python}.").format(
            torch=check.torch_version, device=check.device_text, python=self._plan.python))
        self.backendReady.emit(str(self._plan.python))

    def _finish(self, ok: bool, message: str) -> None:
        # Nothing half-built may stay behind to be mistaken for a backend (or fill the disk).
        if not ok and self._plan is not None and self._plan.dedicated and setup_env.remove_incomplete(self._plan.venv):
            message += " " + tr("The unfinished environment {venv} was removed.").format(venv=self._plan.venv)
        self._set_running(False)
        self.statusLabel.setText(message)
        self._log(("\nDone: " if ok else "\nStopped: ") + message)
        QgsMessageLog.logMessage(message, LOG_TAG, Qgis.Success if ok else Qgis.Warning)
        self.attemptFinished.emit(ok, message)

    def _log(self, text: str) -> None:
        self.logView.appendPlainText(text)

    # --------------------------------------------------------------------------------------- lifecycle
    def reject(self) -> None:
        # Closing while pip runs: stop it rather than leave an orphan process writing to the profile.
        if self._process is not None:
            self.cancel()
            if self._process is not None:
                self._process.waitForFinished(3000)
        super().reject()
