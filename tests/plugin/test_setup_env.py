"""First-run backend setup: interpreter discovery, the install plan, failure advice, and the dialog running
real commands (venv creation, pip against an unreachable proxy, cancel, adopting an existing Python)."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest
from qgis.core import QgsSettings
from qgis.PyQt.QtCore import QSettings
from qgis.PyQt.QtWidgets import QApplication

from idgbr_qgis import setup_env
from idgbr_qgis.backend import SETTINGS_PYTHON
from idgbr_qgis.setup_env import PythonInfo, SetupError

REPO = Path(__file__).resolve().parents[2]
POSIX_ONLY = pytest.mark.skipif(sys.platform.startswith("win"), reason="uses a shell script as a fake python")


@pytest.fixture
def keep_python_setting():
    """The dialog writes the backend interpreter setting; put the developer's value back afterwards."""
    settings = QgsSettings()
    before = settings.value(SETTINGS_PYTHON, None)
    yield
    if before is None:
        settings.remove(SETTINGS_PYTHON)
    else:
        settings.setValue(SETTINGS_PYTHON, before)


def _fake_python(folder: Path, version: str, bits: int = 64) -> Path:
    """A script that answers the probe like a Python of the given version would."""
    major, minor, micro = version.split(".")
    path = folder / "python3"
    path.write_text(
        "#!/bin/sh\n"
        f"echo '{{\"version\": [{major}, {minor}, {micro}], \"bits\": {bits}, \"venv\": true, "
        "\"torch\": false, \"idgbr\": false}'\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the setup dialog"
        QApplication.processEvents()
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------- pure logic


def test_candidates_look_beside_a_non_python_executable(tmp_path):
    # Inside QGIS on Windows sys.executable is qgis-bin.exe: the Python next to it must be found.
    (tmp_path / "bin").mkdir()
    qgis = tmp_path / "bin" / "qgis-bin"
    qgis.write_text("")
    name = "python.exe" if sys.platform.startswith("win") else "python3"
    python = tmp_path / "bin" / name
    python.write_text("")
    found = setup_env.candidate_base_pythons(executable=str(qgis), base_prefix=str(tmp_path), prefix=str(tmp_path))
    assert qgis not in found
    assert found[0] == python


def test_probe_and_find_a_real_python():
    info = setup_env.find_base_python([Path(sys.executable)])
    assert info.version[:2] == sys.version_info[:2]
    assert info.bits == 64 and info.has_venv
    assert info.incompatibility() is None


def test_missing_interpreter_is_named(tmp_path):
    with pytest.raises(SetupError, match="No Python interpreter at"):
        setup_env.probe_python(tmp_path / "nope" / "python")


@POSIX_ONLY
def test_too_old_python_is_refused_with_the_fix(tmp_path):
    old = _fake_python(tmp_path, "3.8.10")
    with pytest.raises(SetupError) as info:
        setup_env.find_base_python([old])
    assert "3.8.10" in str(info.value) and "python.org" in str(info.value)


def test_32_bit_python_is_incompatible():
    info = PythonInfo(Path("python"), (3, 11, 4), 32, True, False, False)
    assert "64-bit" in (info.incompatibility() or "")


def test_plan_installs_torch_from_its_index_then_backend_without_deps(tmp_path):
    base = setup_env.find_base_python([Path(sys.executable)])
    source = setup_env.backend_source_dir()
    assert source == REPO / "backend"
    cpu = setup_env.plan_install(base, tmp_path / "venv", source, cuda=False)
    gpu = setup_env.plan_install(base, tmp_path / "venv", source, cuda=True)
    assert cpu.python == setup_env.venv_python(tmp_path / "venv")
    assert [s.program for s in cpu.steps][0] == str(base.path)
    torch_cpu = next(s for s in cpu.steps if "torch" in s.arguments)
    torch_gpu = next(s for s in gpu.steps if "torch" in s.arguments)
    assert setup_env.TORCH_CUDA_INDEX in torch_gpu.arguments
    if sys.platform != "darwin":
        assert setup_env.TORCH_CPU_INDEX in torch_cpu.arguments
    libraries = next(s for s in cpu.steps if "libraries" in s.title)
    assert not any(a.split("=")[0].split("<")[0].split(">")[0] == "torch" for a in libraries.arguments)
    assert any(a.startswith("numpy") for a in libraries.arguments)
    backend = next(s for s in cpu.steps if s.title == "Installing the IDGBR backend")
    assert "--no-deps" in backend.arguments and str(source) in backend.arguments
    assert cpu.steps[-1].arguments == setup_env.verify_arguments()


def test_missing_backend_source_says_reinstall(tmp_path):
    with pytest.raises(SetupError, match="Reinstall the plugin"):
        setup_env.backend_source_dir(tmp_path / "idgbr_qgis")


def test_disk_space_is_checked_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(setup_env, "SPACE_CPU_BYTES", 1 << 60)
    with pytest.raises(SetupError, match="Not enough disk space"):
        setup_env.check_disk_space(tmp_path / "not" / "yet", cuda=False)
    monkeypatch.setattr(setup_env, "SPACE_CPU_BYTES", 1)
    setup_env.check_disk_space(tmp_path / "not" / "yet", cuda=False)


@pytest.mark.parametrize(
    ("log", "advice"),
    [
        ("OSError: [Errno 28] No space left on device", "disk is full"),
        ("ProxyError('Cannot connect to proxy.', ...)", "proxy"),
        ("SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED]", "certificate"),
        ("NewConnectionError: Failed to establish a new connection: [Errno -3] Temporary failure in name "
         "resolution", "could not be reached"),
        ("ERROR: Could not find a version that satisfies the requirement torch (from versions: none)\n"
         "ERROR: No matching distribution found for torch", "No PyTorch build was found for this Python"),
        ("error: externally-managed-environment", "dedicated"),
        ("ERROR: Could not install packages due to an OSError: [WinError 5] Access is denied", "antivirus"),
    ],
)
def test_failures_are_explained(log, advice):
    assert advice in setup_env.explain_failure(log, 1)


def test_unknown_failure_quotes_the_log_tail():
    message = setup_env.explain_failure("first\nsecond\nsomething odd happened", 3)
    assert "exit code 3" in message and "something odd happened" in message


def test_verify_output_is_parsed_and_missing_modules_explained():
    out = 'noise\nIDGBR-CHECK {"torch": "2.3.0", "cuda": true, "gpu": "NVIDIA RTX 4000", "idgbr": "0.1.0"}\n'
    check = setup_env.parse_verify_output(Path("py"), out)
    assert check.torch_version == "2.3.0" and check.device_text == "GPU (NVIDIA RTX 4000)"
    with pytest.raises(SetupError, match="has no PyTorch"):
        setup_env.parse_verify_output(Path("py"), "ModuleNotFoundError: No module named 'torch'")
    with pytest.raises(SetupError, match="not the IDGBR backend"):
        setup_env.parse_verify_output(Path("py"), "ModuleNotFoundError: No module named 'idgbr'")


def test_qgis_proxy_setting_becomes_a_pip_proxy_url(tmp_path):
    from idgbr_qgis.ui.setup_dialog import qgis_proxy_url

    settings = QgsSettings(str(tmp_path / "proxy.ini"), QSettings.IniFormat)
    assert qgis_proxy_url(settings) is None
    settings.setValue("proxy/proxyEnabled", True)
    settings.setValue("proxy/proxyType", "HttpProxy")
    settings.setValue("proxy/proxyHost", "proxy.example.org")
    settings.setValue("proxy/proxyPort", "3128")
    settings.setValue("proxy/proxyUser", "ann")
    settings.setValue("proxy/proxyPassword", "p@ss word")
    assert qgis_proxy_url(settings) == "http://ann:p%40ss%20word@proxy.example.org:3128"


# --------------------------------------------------------------------------------- the dialog, for real


@pytest.fixture
def dialog(qgis_app, tmp_path, keep_python_setting):
    from idgbr_qgis.ui.setup_dialog import SetupDialog

    dlg = SetupDialog(None, profile_dir=tmp_path / "profile")
    results: list[tuple[bool, str]] = []
    dlg.attemptFinished.connect(lambda ok, msg: results.append((ok, msg)))
    dlg.results = results
    yield dlg
    if dlg.is_running():
        dlg.cancel()
        _wait(lambda: not dlg.is_running(), 30)
    dlg.deleteLater()


def test_unreachable_proxy_ends_with_advice_and_qgis_stays_live(dialog, monkeypatch):
    # A dead proxy makes every download fail fast and the same way on any machine.
    for key in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(key, "http://127.0.0.1:9")
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip only logs the connection error when it retries
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    # Ignore this machine's pip configuration (local wheel folders would let the install succeed offline).
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for key in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"):
        monkeypatch.delenv(key, raising=False)
    before = QgsSettings().value(SETTINGS_PYTHON, None)
    ticks = []
    dialog.start_create(cuda=False)
    assert dialog.is_running()
    _wait(lambda: ticks.append(1) or bool(dialog.results), 240)
    ok, message = dialog.results[-1]
    assert not ok
    assert "PyTorch" in message and "proxy" in message.lower()
    assert len(ticks) > 10  # the event loop kept running while pip worked
    assert setup_env.venv_python(dialog._venv).is_file()  # the venv step itself succeeded
    assert QgsSettings().value(SETTINGS_PYTHON, None) == before
    assert dialog.startButton.isEnabled() and not dialog.cancelButton.isEnabled()


def test_cancel_stops_the_running_command(dialog):
    dialog.start_create(cuda=False)
    assert dialog.is_running() and dialog.cancelButton.isEnabled()
    dialog.cancel()
    _wait(lambda: bool(dialog.results), 30)
    ok, message = dialog.results[-1]
    assert not ok and "cancelled" in message
    assert not dialog.is_running()


def test_existing_python_with_torch_and_backend_is_adopted(dialog):
    python = REPO / ".venv" / ("Scripts/python.exe" if sys.platform.startswith("win") else "bin/python")
    ready: list[str] = []
    dialog.backendReady.connect(ready.append)
    dialog.start_existing(python)
    _wait(lambda: bool(dialog.results), 180)
    ok, message = dialog.results[-1]
    assert ok, message
    assert "PyTorch" in message and "CPU" in message or "GPU" in message
    assert ready == [str(python)]
    assert QgsSettings().value(SETTINGS_PYTHON) == str(python)


@POSIX_ONLY
def test_existing_python_that_is_too_old_is_refused(dialog, tmp_path):
    dialog.start_existing(_fake_python(tmp_path, "3.7.9"))
    assert dialog.results and not dialog.results[-1][0]
    assert "3.7.9" in dialog.results[-1][1]
    assert not dialog.is_running()
