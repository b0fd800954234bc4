"""First-run backend setup: interpreter discovery, the install plan and where its packages come from, failure
advice, and the dialog running real commands (venv creation, pip against an unreachable proxy, cancel,
adopting an existing Python), including what a failed or a finished setup leaves behind."""

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

from idgbr_qgis import backend_process, setup_env
from idgbr_qgis.backend_process import SETTINGS_PYTHON, BackendUnavailable
from idgbr_qgis.setup_env import InstallPlan, PythonInfo, SetupError, Step

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


@pytest.fixture
def no_pip_settings(monkeypatch):
    """No package index in this machine's pip settings (variables or files) reaches the plan."""
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(setup_env, "pip_config_files", lambda env=None: [])


def _reachable(answer: bool, asked: list | None = None):
    """A stand-in for the network check of PyTorch's index."""
    def check(url, proxy_url=None, timeout=5.0):
        if asked is not None:
            asked.append(url)
        return answer
    return check


def _pip_installs(plan: InstallPlan) -> list[Step]:
    return [s for s in plan.steps if s.arguments[:3] == ["-m", "pip", "install"]]


def _torch_step(plan: InstallPlan) -> Step:
    return next(s for s in plan.steps if "torch" in s.arguments)


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


def test_plan_installs_torch_from_its_index_then_backend_without_deps(tmp_path, no_pip_settings, monkeypatch):
    monkeypatch.setattr(setup_env, "index_reachable", _reachable(True))
    base = setup_env.find_base_python([Path(sys.executable)])
    source = setup_env.backend_source_dir()
    assert source == REPO / "backend"
    cpu = setup_env.plan_install(base, tmp_path / "venv", source, cuda=False)
    gpu = setup_env.plan_install(base, tmp_path / "venv", source, cuda=True)
    assert cpu.python == setup_env.venv_python(tmp_path / "venv")
    assert [s.program for s in cpu.steps][0] == str(base.path)
    torch_cpu = next(s for s in cpu.steps if "torch" in s.arguments)
    torch_gpu = next(s for s in gpu.steps if "torch" in s.arguments)
    assert torch_gpu.arguments[-2:] == ["--index-url", setup_env.TORCH_CUDA_INDEX]
    if sys.platform != "darwin":
        assert torch_cpu.arguments[-2:] == ["--index-url", setup_env.TORCH_CPU_INDEX]
    assert cpu.dedicated and not cpu.notes
    libraries = next(s for s in cpu.steps if "libraries" in s.title)
    assert not any(a.split("=")[0].split("<")[0].split(">")[0] == "torch" for a in libraries.arguments)
    assert any(a.startswith("numpy") for a in libraries.arguments)
    backend = next(s for s in cpu.steps if s.title == "Installing the IDGBR backend")
    assert "--no-deps" in backend.arguments and str(source) in backend.arguments
    assert cpu.steps[-1].arguments == setup_env.verify_arguments()


@pytest.mark.parametrize("where", ["PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "pip.conf"])
def test_an_index_in_the_users_pip_settings_is_kept(tmp_path, no_pip_settings, monkeypatch, where):
    # An offline mirror or a company proxy's index: --index-url would replace it, so PyTorch's index is added.
    monkeypatch.setattr(setup_env, "index_reachable", _reachable(True))
    if where == "pip.conf":
        conf = tmp_path / "pip.conf"
        conf.write_text("[global]\nindex_url = https://mirror.example.org/simple\n", encoding="utf-8")
        monkeypatch.setattr(setup_env, "pip_config_files", lambda env=None: [tmp_path / "absent.conf", conf])
    else:
        monkeypatch.setenv(where, "https://mirror.example.org/simple")
    base = setup_env.find_base_python([Path(sys.executable)])
    plan = setup_env.plan_install(base, tmp_path / "venv", setup_env.backend_source_dir(), cuda=True)
    assert all("--index-url" not in s.arguments for s in plan.steps)
    assert _torch_step(plan).arguments[-2:] == ["--extra-index-url", setup_env.TORCH_CUDA_INDEX]
    assert any("kept" in note and (where in note) for note in plan.notes), plan.notes


def test_pip_settings_files_are_read_as_pip_reads_them(tmp_path):
    conf = tmp_path / "pip.ini"
    conf.write_text("[install]\nfind-links = D:\\wheels\n", encoding="utf-8")
    assert setup_env.user_index_source({"PIP_CONFIG_FILE": str(conf)}) == str(conf)
    assert setup_env.user_index_source({"PIP_NO_INDEX": "1"}) == "PIP_NO_INDEX"
    # PIP_CONFIG_FILE=os.devnull makes pip read no file at all.
    assert setup_env.pip_config_files({"PIP_CONFIG_FILE": os.devnull}) == []
    assert setup_env.user_index_source({"PIP_CONFIG_FILE": os.devnull}) is None
    unrelated = tmp_path / "other.conf"
    unrelated.write_text("[global]\ntimeout = 60\n", encoding="utf-8")
    files = setup_env.pip_config_files({"PIP_CONFIG_FILE": str(unrelated), "HOME": str(tmp_path),
                                        "USERPROFILE": str(tmp_path)})
    assert files[-1] == unrelated and all(tmp_path not in f.parents for f in files[:-1])


def test_unreachable_pytorch_index_falls_back_to_the_default_index(tmp_path, no_pip_settings, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(setup_env, "index_reachable", _reachable(False, asked))
    base = setup_env.find_base_python([Path(sys.executable)])
    plan = setup_env.plan_install(base, tmp_path / "venv", setup_env.backend_source_dir(), cuda=True)
    assert asked == [setup_env.TORCH_CUDA_INDEX]
    assert all(not a.startswith("--") or a in setup_env.PIP_FLAGS for a in _torch_step(plan).arguments)
    assert any("cannot be reached" in note and "default package index" in note for note in plan.notes)


def test_index_reachability_is_asked_of_the_index_itself(monkeypatch):
    # A package index on this machine's loopback: no internet involved.
    import http.server
    import socket
    import threading

    for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(key, raising=False)

    class Index(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server API
            self.send_response(200 if self.path == "/simple/torch/" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        assert setup_env.index_reachable(f"http://127.0.0.1:{port}/simple")
        assert not setup_env.index_reachable(f"http://127.0.0.1:{port}/other")  # answers, but has no torch
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        free_port = closed.getsockname()[1]
    assert not setup_env.index_reachable(f"http://127.0.0.1:{free_port}/simple")  # nothing listens


def test_the_package_index_from_settings_is_used_for_every_package(tmp_path, no_pip_settings, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(setup_env, "index_reachable", _reachable(True, asked))
    mirror = "https://mirror.example.org/simple"
    base = setup_env.find_base_python([Path(sys.executable)])
    plan = setup_env.plan_install(base, tmp_path / "venv", setup_env.backend_source_dir(), cuda=False,
                                  index_url=mirror)
    installs = _pip_installs(plan)
    assert len(installs) == 4  # pip, torch, the libraries, the backend (whose build needs setuptools)
    for step in installs:
        assert step.arguments[step.arguments.index("--index-url") + 1] == mirror
        assert "--extra-index-url" not in step.arguments and setup_env.TORCH_CPU_INDEX not in step.arguments
    assert asked == []  # PyTorch's own index is not even tried
    assert any(mirror in note for note in plan.notes)


def test_index_url_setting_is_checked_and_persisted(tmp_path):
    from idgbr_qgis.ui import config

    assert config.index_url_problem("") is None
    assert config.index_url_problem("https://mirror.example.org/simple") is None
    assert "web address" in (config.index_url_problem("mirror.example.org") or "")
    settings = QgsSettings(str(tmp_path / "settings.ini"), QSettings.IniFormat)
    config.UserSettings(index_url="https://mirror.example.org/simple").save(settings)
    assert config.UserSettings.load(settings).index_url == "https://mirror.example.org/simple"


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
    monkeypatch.setattr(setup_env, "index_reachable", _reachable(True))
    before = QgsSettings().value(SETTINGS_PYTHON, None)
    ticks = []
    dialog.start_create(cuda=False)
    assert dialog.is_running()
    _wait(lambda: ticks.append(1) or bool(dialog.results), 240)
    ok, message = dialog.results[-1]
    assert not ok
    assert "PyTorch" in message and "proxy" in message.lower()
    assert len(ticks) > 10  # the event loop kept running while pip worked
    assert "Creating the virtual environment" in dialog.logView.toPlainText()  # that step succeeded
    # Nothing half-built stays behind to be taken for a backend.
    assert "unfinished environment" in message and not dialog._venv.exists()
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
    assert not dialog._venv.exists()  # the interrupted environment is gone


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


# ------------------------------------------------------------------------- what a setup leaves behind

_MAKE_PYTHON = ("import pathlib, sys; p = pathlib.Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); "
                "p.write_text('')")
_PIP_FAILS = ("import sys; print('ERROR: Could not find a version that satisfies the requirement torch "
              "(from versions: none)'); print('ERROR: No matching distribution found for torch'); sys.exit(1)")
_CHECK_PASSES = ("print('IDGBR-CHECK {\"torch\": \"2.3.0\", \"cuda\": false, \"gpu\": \"\", "
                 "\"idgbr\": \"0.1.0\"}')")


@pytest.fixture
def scripted_setup(dialog, monkeypatch):
    """The dialog's 'Create' with scripted steps in place of venv and pip: (last step's code) -> None.

    The first step makes the environment's interpreter file, as `python -m venv` does; the backend looks
    for the environment where the dialog builds it.
    """
    monkeypatch.setattr(setup_env, "SPACE_CPU_BYTES", 1)
    monkeypatch.setattr(backend_process, "profile_venv", lambda: dialog._venv)
    monkeypatch.setattr(backend_process, "dev_checkout_venv", lambda: dialog._venv.parent / "no-checkout")
    monkeypatch.delenv(backend_process.ENV_PYTHON, raising=False)
    QgsSettings().remove(SETTINGS_PYTHON)

    def start(last_step: str) -> None:
        def plan(base, venv, source, cuda, **_kwargs):
            python = setup_env.venv_python(venv)
            steps = [Step("Creating the virtual environment", sys.executable, ["-c", _MAKE_PYTHON, str(python)]),
                     Step("Installing PyTorch (CPU build)", sys.executable, ["-c", last_step])]
            return InstallPlan(base, venv, python, cuda, source, steps, dedicated=True)

        monkeypatch.setattr(setup_env, "plan_install", plan)
        dialog.start_create(cuda=False)
        _wait(lambda: bool(dialog.results), 60)

    return start


def test_a_failed_setup_leaves_nothing_that_counts_as_a_backend(dialog, scripted_setup):
    scripted_setup(_PIP_FAILS)
    ok, message = dialog.results[-1]
    assert not ok and "No PyTorch build was found" in message
    assert "make install" not in message
    assert not dialog._venv.exists() and "unfinished environment" in message
    with pytest.raises(BackendUnavailable) as info:
        backend_process.find_python()
    assert "Set up backend" in str(info.value) and "make install" not in str(info.value)
    assert QgsSettings().value(SETTINGS_PYTHON, None) is None
    assert dialog.startButton.isEnabled()  # and it can be started again at once


def test_a_leftover_without_the_completion_marker_is_no_backend(dialog, scripted_setup):
    # Left by a QGIS that crashed during the setup: the interpreter exists, the marker does not.
    leftover = setup_env.venv_python(dialog._venv)
    leftover.parent.mkdir(parents=True)
    leftover.write_text("")
    with pytest.raises(BackendUnavailable, match="Set up backend"):
        backend_process.find_python()
    # Even when the setting names it, it is reported as incomplete rather than started.
    QgsSettings().setValue(SETTINGS_PYTHON, str(leftover))
    with pytest.raises(BackendUnavailable, match="incomplete.*Set up backend"):
        backend_process.find_python()
    # The next setup replaces it and marks it complete only once its check passed.
    scripted_setup(_CHECK_PASSES)
    ok, message = dialog.results[-1]
    assert ok, message
    assert setup_env.is_complete(dialog._venv)
    assert backend_process.find_python()[0] == leftover
    assert QgsSettings().value(SETTINGS_PYTHON) == str(leftover)
