"""One shared connection per QGIS session to the backend service (a separate Python process with torch).

The manager finds the backend interpreter, starts or connects to `idgbr serve` through
`backend_client`, hands the client to the toolbox algorithms and the dock, and stops the service on
unload when this QGIS session started it. While "Use a remote backend" is ticked in the settings it hands
out a client of that service instead (`remote_config`), and starts nothing. Thread-safe: Processing runs
algorithms in worker threads.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

from qgis.core import QgsApplication, QgsSettings
from qgis.PyQt.QtCore import QSettings

from .i18n import tr
from .setup_env import is_complete

if TYPE_CHECKING:
    from .backend_client import BackendClient, RemoteBackendClient
    from .remote_config import RemoteSettings

SETTINGS_PYTHON = "idgbr/python"
ENV_PYTHON = "IDGBR_PYTHON"
START_TIMEOUT_S = 60.0
SETUP_BUTTON = "'Set up backend…' in the IDGBR panel or in Plugins ▸ IDGBR ▸ Settings…"

_WINDOWS = sys.platform.startswith("win")


class BackendUnavailable(Exception):
    """No usable backend interpreter or service; the message says what to do."""


class RemoteUnavailable(Exception):
    """The remote backend in the settings cannot be used (address, token, certificate, network); the message
    says what to change. Not a reason to set up a local backend."""


def venv_python(venv: Path) -> Path:
    """The interpreter of a virtual environment on this platform."""
    return venv / ("Scripts/python.exe" if _WINDOWS else "bin/python")


def profile_venv() -> Path:
    """The environment that first-run setup creates inside the QGIS profile."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "idgbr" / "venv"


def dev_checkout_venv() -> Path:
    """`<repo>/.venv` when the plugin runs from a source checkout (the plugin folder sits in the repo root)."""
    return Path(__file__).resolve().parent.parent / ".venv"


def development_python() -> Path:
    """For tests and developer tools: $IDGBR_PYTHON, else the checkout's `.venv`, else the running interpreter."""
    env = os.environ.get(ENV_PYTHON, "").strip()
    if env:
        return Path(env)
    venv = venv_python(dev_checkout_venv())
    return venv if venv.is_file() else Path(sys.executable)


def configured_python() -> str:
    """The interpreter chosen in Plugins ▸ IDGBR ▸ Settings…, or "".

    QGIS and qgis_process keep QgsSettings in the profile's QGIS/QGIS3.ini. A standalone PyQGIS script's
    QgsSettings is another file, so there the profile's file (the default profile, or the one under
    QGIS_CUSTOM_CONFIG_PATH) is read directly.
    """
    settings = QgsSettings()
    value = str(settings.value(SETTINGS_PYTHON, "") or "").strip()
    profile_ini = Path(QgsApplication.qgisSettingsDirPath()) / "QGIS" / "QGIS3.ini"
    if value or not profile_ini.is_file() or _same_file(Path(settings.fileName()), profile_ini):
        return value
    return str(QSettings(str(profile_ini), QSettings.IniFormat).value(SETTINGS_PYTHON, "") or "").strip()


def _same_file(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def python_candidates() -> List[Tuple[str, Path, bool]]:
    """Where the backend interpreter may come from, in priority order: (source, path, explicit).

    Explicit sources (the environment variable, then the setting) are what the user chose: when one is set
    but broken, that is reported instead of silently falling back to another interpreter. The variable
    comes first because it is set for one process (a script, a qgis_process run), the setting for all.
    """
    candidates: List[Tuple[str, Path, bool]] = []
    env = os.environ.get(ENV_PYTHON, "").strip()
    if env:
        candidates.append((tr("the environment variable {variable}").format(variable=ENV_PYTHON), Path(env), True))
    configured = configured_python()
    if configured:
        candidates.append((tr("the IDGBR setting '{key}'").format(key=SETTINGS_PYTHON), Path(configured), True))
    candidates.append((tr("the source checkout's virtual environment"), venv_python(dev_checkout_venv()), False))
    candidates.append((tr("the environment made by the IDGBR first-run setup"), venv_python(profile_venv()), False))
    return candidates


def find_python() -> Tuple[Path, str]:
    """The backend interpreter and where it was found; BackendUnavailable says how to get one."""
    setup_python = venv_python(profile_venv())
    for source, path, explicit in python_candidates():
        if _same_file(path, setup_python) and not is_complete(profile_venv()):
            # A setup that failed or was interrupted left this environment: it is no backend.
            if explicit:
                raise BackendUnavailable(tr(
                    "The IDGBR environment {venv} is incomplete: its setup did not finish. Press {button} to set "
                    "it up again."
                ).format(venv=profile_venv(), button=tr(SETUP_BUTTON)))
            continue
        if path.is_file():
            return path, source
        if explicit:
            fix = (tr("Set {variable} to an existing interpreter, or unset it").format(variable=ENV_PYTHON)
                   if ENV_PYTHON in source else
                   tr("Choose an existing interpreter in Plugins ▸ IDGBR ▸ Settings…, or clear the setting"))
            raise BackendUnavailable(tr(
                "The backend Python set by {source} does not exist: {python}. {fix} to use the environment made "
                "by the first-run setup."
            ).format(source=source, python=path, fix=fix))
    raise BackendUnavailable(tr(
        "No IDGBR backend is installed yet. Press {button} to install PyTorch and the backend in {venv}, or "
        "choose a Python that has them in Plugins ▸ IDGBR ▸ Settings… (scripts and qgis_process may also set the "
        "environment variable {variable})."
    ).format(button=tr(SETUP_BUTTON), venv=profile_venv(), variable=ENV_PYTHON))


class BackendManager:
    """The session's backend service: started on first use, reused while alive, restarted after it died."""

    _instance: Optional[BackendManager] = None
    _instance_lock = threading.Lock()

    def __init__(self, state_dir: Optional[Path] = None, timeout: float = START_TIMEOUT_S,
                 locate: Callable[[], Tuple[Path, str]] = find_python) -> None:
        self._state_dir = state_dir
        self._timeout = timeout
        self._locate = locate
        self._lock = threading.RLock()
        self._client: Optional[BackendClient] = None  # the local service
        self._python: Optional[Path] = None
        self._remote: Optional[RemoteBackendClient] = None
        self._remote_key: Optional[tuple] = None  # the settings it was made with
        self._atexit_registered = False

    @classmethod
    def instance(cls) -> BackendManager:
        """The one manager of this QGIS session (shared by the toolbox algorithms and the dock)."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @classmethod
    def set_instance(cls, manager: Optional[BackendManager]) -> Optional[BackendManager]:
        """Replace the session's manager (tests, embedding applications); returns the previous one."""
        with cls._instance_lock:
            previous, cls._instance = cls._instance, manager
            return previous

    @property
    def python(self) -> Optional[Path]:
        """The interpreter of the current connection, None before the first one."""
        return self._python

    @property
    def started_here(self) -> bool:
        """Whether the current service is this session's child (and so is stopped by `shutdown`)."""
        with self._lock:
            return self._client is not None and getattr(self._client, "process", None) is not None

    def is_connected(self) -> bool:
        """Whether a client exists (it may have died since; `client()` checks)."""
        with self._lock:
            return self._client is not None or self._remote is not None

    def client(self) -> BackendClient:
        """A live client: the current one when the service answers, else a fresh start or connection; the
        remote backend's while it is enabled in the settings.

        Raises BackendUnavailable (no interpreter), the client's BackendError (start failed) or
        RemoteUnavailable (the remote backend cannot be used), each with a message that names the fix.
        """
        from .backend_client import BackendClient, BackendError
        from .remote_config import RemoteSettings

        remote = RemoteSettings.load()
        if remote.enabled:
            return self._remote_client(remote)
        with self._lock:
            if self._client is not None:
                try:
                    self._client.health()
                    return self._client
                except BackendError:
                    # The service died or was stopped: forget it and start a fresh one below.
                    self._client = None
            python, _source = self._locate()
            # The service stops by itself once this QGIS ends, even by a crash or kill -9 (its job cancelled).
            self._client = BackendClient.start_or_connect(str(python), state_dir=self._state_dir,
                                                          timeout=self._timeout, parent_pid=os.getpid())
            self._python = python
            if self._client.process is not None and not self._atexit_registered:
                # Standalone PyQGIS scripts never unload the plugin: stop our child when Python exits.
                atexit.register(self.shutdown)
                self._atexit_registered = True
            return self._client

    def _remote_client(self, settings: RemoteSettings) -> RemoteBackendClient:
        """The remote backend's client, checked with /health; a new one when the settings (or the token in the
        token file) changed or the old one stopped answering."""
        from .backend_client import BackendError

        with self._lock:
            try:
                settings.check_url()
                key = settings.key(settings.token())
                if self._remote is not None and self._remote_key == key:
                    try:
                        self._remote.health()
                        return self._remote
                    except BackendError:
                        self._remote = None  # try once more with a fresh connection below
                client = settings.client()
                client.health()
            except BackendError as exc:
                self._remote = self._remote_key = None
                raise RemoteUnavailable(tr("The remote IDGBR backend cannot be used: {reason}").format(
                    reason=exc)) from exc
            self._remote, self._remote_key = client, key
            return client

    def forget(self) -> None:
        """Drop the connection without stopping the service (after a settings change: next use reconnects)."""
        with self._lock:
            self._client = None
            self._python = None
            self._remote = self._remote_key = None

    def shutdown(self) -> None:
        """Stop the service when this session started it; one started elsewhere (another QGIS, a user's
        `idgbr serve`) keeps running and is only disconnected."""
        from .backend_client import BackendError

        with self._lock:
            client, self._client = self._client, None
            self._python = None
            self._remote = self._remote_key = None  # a remote service is only disconnected
        if client is None or client.process is None:
            return
        with contextlib.suppress(BackendError):  # already gone: nothing left to stop
            client.shutdown()
