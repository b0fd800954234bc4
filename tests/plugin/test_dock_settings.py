"""The settings dialog: values persist in QgsSettings, bad values are refused, "Test backend" reports."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from qgis.core import QgsSettings
from qgis.PyQt.QtWidgets import QApplication

from idgbr_qgis.backend_process import SETTINGS_PYTHON, BackendManager, BackendUnavailable
from idgbr_qgis.ui import config
from idgbr_qgis.ui.settings_dialog import SettingsDialog, describe_health

KEYS = (SETTINGS_PYTHON, config.KEY_DEVICE, config.KEY_MODEL, config.KEY_STEPS, config.KEY_BAND,
        config.KEY_VOCABULARY, config.KEY_MIN_CONFIDENCE, config.KEY_SHOW_CONFIDENCE, config.KEY_OUTPUT_DIR,
        config.KEY_PIXEL_SIZE, config.KEY_INDEX_URL)


@pytest.fixture
def keep_settings():
    settings = QgsSettings()
    saved = {key: settings.value(key, None) for key in KEYS}
    yield settings
    for key, value in saved.items():
        if value is None:
            settings.remove(key)
        else:
            settings.setValue(key, value)


def _no_backend():
    raise BackendUnavailable("none here")


def _wait(results: list, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not results:
        assert time.monotonic() < deadline, "timed out waiting for the backend test"
        QApplication.processEvents()
        time.sleep(0.02)


def test_values_persist_and_the_manager_reconnects_after_an_interpreter_change(keep_settings, tmp_path):
    forgotten: list[bool] = []

    class Manager(BackendManager):
        def forget(self) -> None:
            forgotten.append(True)

    dialog = SettingsDialog(Manager(locate=_no_backend))
    dialog.pythonWidget.setFilePath(sys.executable)
    dialog.deviceCombo.setCurrentIndex(dialog.deviceCombo.findData("cpu"))
    dialog.modelCombo.setCurrentIndex(dialog.modelCombo.findData("roads2"))
    dialog.stepsSpin.setValue(6)
    dialog.precisionCombo.setCurrentIndex(dialog.precisionCombo.findData("bf16"))
    dialog.pixelSizeSpin.setValue(0.05)
    dialog.outputWidget.setFilePath(str(tmp_path))
    dialog.accept()
    assert dialog.result() == dialog.Accepted
    assert keep_settings.value(SETTINGS_PYTHON) == sys.executable
    user = config.UserSettings.load()
    assert (user.device, user.model, user.steps, user.output_dir) == ("cpu", "roads2", 6, str(tmp_path))
    assert user.pixel_size == pytest.approx(0.05) and config.pixel_size_field(user.pixel_size) == 0.05
    assert user.precision == "bf16" and config.precision_field(user.precision) == "bf16"
    assert forgotten == [True]
    # A fresh dialog shows what was saved.
    again = SettingsDialog(Manager(locate=_no_backend))
    assert again.python_path() == sys.executable
    assert again.deviceCombo.currentData() == "cpu" and again.model_value() == "roads2"
    assert again.stepsSpin.value() == 6 and again.pixelSizeSpin.value() == pytest.approx(0.05)
    assert again.precisionCombo.currentData() == "bf16"
    assert config.pixel_size_field(0.0) is None  # 0: the backend reads the layer's CRS
    again.reject()


def test_bad_values_are_refused_with_the_fix(keep_settings, tmp_path):
    dialog = SettingsDialog(BackendManager(locate=_no_backend))
    dialog.pythonWidget.setFilePath(str(tmp_path / "missing" / "python"))
    dialog.accept()
    assert dialog.result() != dialog.Accepted
    assert "does not exist" in dialog.testLabel.text()
    dialog.pythonWidget.setFilePath("")
    dialog.modelCombo.setCurrentIndex(dialog.modelCombo.findData("__other__"))
    dialog.modelFile.setFilePath(str(tmp_path / "nope.safetensors"))
    assert "does not exist" in (dialog.validate() or "")
    dialog.reject()


def test_package_index_for_the_setup_is_saved_and_reaches_the_setup(keep_settings, monkeypatch):
    from idgbr_qgis.ui import setup_dialog

    dialog = SettingsDialog(BackendManager(locate=_no_backend))
    dialog.indexEdit.setText("mirror.example.org")
    dialog.accept()
    assert dialog.result() != dialog.Accepted and "web address" in dialog.testLabel.text()
    mirror = "https://mirror.example.org/simple"
    dialog.indexEdit.setText(mirror)
    # The setup opened from here installs from the index in the field, saved or not yet.
    opened: list[str] = []
    monkeypatch.setattr(setup_dialog.SetupDialog, "exec_", lambda self: opened.append(self._index_url) or 0)
    dialog.open_setup()
    assert opened == [mirror]
    dialog.accept()
    assert dialog.result() == dialog.Accepted
    assert config.UserSettings.load().index_url == mirror
    again = SettingsDialog(BackendManager(locate=_no_backend))
    assert again.indexEdit.text() == mirror
    # A setup opened elsewhere (the dock) uses the saved one.
    assert setup_dialog.SetupDialog(None)._index_url == mirror
    again.reject()


def test_idgbr_python_in_qgis_environment_is_shown(keep_settings, monkeypatch):
    monkeypatch.setenv("IDGBR_PYTHON", sys.executable)
    dialog = SettingsDialog(BackendManager(locate=_no_backend))
    assert "IDGBR_PYTHON" in dialog.pythonSourceLabel.text() and sys.executable in dialog.pythonSourceLabel.text()
    dialog.reject()


def test_test_backend_reports_torch_device_and_gpu(keep_settings, idgbr_backend):
    dialog = SettingsDialog(idgbr_backend)
    dialog.pythonWidget.setFilePath(str(idgbr_backend.python))
    results: list[tuple[bool, str]] = []
    dialog.testFinished.connect(lambda ok, text: results.append((ok, text)))
    dialog.test_backend()
    _wait(results, 180)
    ok, text = results[-1]
    assert ok, text
    assert "torch" in text and "Device:" in text and "GPU:" in text
    assert text == dialog.testLabel.text()
    dialog.reject()


def test_test_backend_with_a_python_without_the_backend_says_so(keep_settings, tmp_path):
    # A virtual environment without torch or the backend: the test must fail with the reason.
    import venv

    bare = tmp_path / "bare"
    venv.EnvBuilder(with_pip=False).create(bare)
    python = bare / ("Scripts/python.exe" if sys.platform.startswith("win") else "bin/python")
    dialog = SettingsDialog(BackendManager(locate=_no_backend))
    dialog.pythonWidget.setFilePath(str(python))
    results: list[tuple[bool, str]] = []
    dialog.testFinished.connect(lambda ok, text: results.append((ok, text)))
    dialog.test_backend()
    _wait(results, 120)
    ok, text = results[-1]
    assert not ok
    assert "Test failed" in text and ("torch" in text or "idgbr" in text)
    dialog.reject()


def test_health_is_described_for_gpu_and_cpu():
    gpu = describe_health({"torch": "2.3.1", "torch_cuda": "12.1", "device": "cuda", "device_name": "NVIDIA A10"})
    assert "torch 2.3.1 (CUDA 12.1)" in gpu and "Device: CUDA" in gpu and "GPU: NVIDIA A10" in gpu
    cpu = describe_health({"torch": "2.13.0+cpu", "device": "cpu", "device_reason": "this torch build has no CUDA"})
    assert "Device: CPU" in cpu and "GPU: —" in cpu and "no CUDA" in cpu


def test_device_label_names_the_gpu_or_why_cpu():
    from idgbr_qgis.ui.device import describe_device

    label, tip = describe_device({"torch": "2.5.1", "torch_cuda": "12.1", "device": "cuda",
                                  "device_name": "NVIDIA RTX 4000 Ada"})
    assert label == "Device: GPU — NVIDIA RTX 4000 Ada" and "CUDA 12.1" in tip
    label, tip = describe_device({"torch": "2.13.0+cpu", "device": "cpu", "device_reason": (
        "torch.cuda.is_available() is False: this torch build has no CUDA support (install a CUDA build of torch "
        "to use an NVIDIA GPU)")})
    assert label == "Device: CPU — this torch build has no CUDA support"
    assert "install a CUDA build" in tip


def test_model_choices_come_from_the_bundled_files():
    names = config.model_choices()
    assert "dubai5" in names
    card = config.read_model_card(config.bundled_models()["dubai5"])
    assert card["classes"] and card["name"] == "dubai5"
    assert config.read_model_card(Path(__file__)) == {}


class RecordingClient:
    """Stands in for the backend client: records the jobs it is given, each one succeeds at once."""

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def client(self) -> RecordingClient:  # also the manager: the runner asks it for a client
        return self

    def models(self) -> list:
        return []

    def submit(self, **fields):
        self.submitted.append(fields)
        return str(len(self.submitted))

    def wait(self, job_id, **_kwargs):
        return {"state": "succeeded", "result": {"classes": [], "notes": []}}


def _dock_run_jobs(sample_raster, tmp_path, **spec_fields) -> list[dict]:
    """The backend jobs of one dock run (coarse, then refine) with these JobSpec fields."""
    from qgis.core import QgsRasterLayer

    from idgbr_qgis.jobs import inputs
    from idgbr_qgis.jobs.spec import JobSpec
    from idgbr_qgis.ui.refine_task import RefineTask

    backend = RecordingClient()
    layer = QgsRasterLayer(str(sample_raster), "sample")
    spec = JobSpec(mode="refine", input=inputs.describe(layer), output=tmp_path / "r.tif",
                   coarse_output=tmp_path / "c.tif", **spec_fields)
    assert RefineTask(backend, spec, "sample").run()
    assert [job["mode"] for job in backend.submitted] == ["segment", "refine"]
    return backend.submitted


@pytest.mark.parametrize("setting, sent", [(0.05, 0.05), (0.0, None)])
def test_dock_run_sends_the_pixel_size_setting(sample_raster, tmp_path, setting, sent):
    """Settings… ▸ Input pixel size reaches both backend jobs of a dock run (coarse, refine); 0 sends none."""
    jobs = _dock_run_jobs(sample_raster, tmp_path, pixel_size=config.pixel_size_field(setting))
    assert [job.get("pixel_size") for job in jobs] == [sent, sent]


@pytest.mark.parametrize("setting, sent", [("bf16", "bf16"), ("", None)])
def test_dock_run_sends_the_precision_setting(sample_raster, tmp_path, setting, sent):
    """Settings… ▸ Precision reaches both backend jobs of a dock run; the device default sends none."""
    jobs = _dock_run_jobs(sample_raster, tmp_path, precision=config.precision_field(setting))
    assert [job.get("precision") for job in jobs] == [sent, sent]
