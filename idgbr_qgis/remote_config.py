"""The remote backend settings (Plugins ▸ IDGBR ▸ Settings… ▸ Remote backend) and the client they give.

Only the token file's path is kept in QgsSettings, never the token: a token pasted in the dialog is written to
a file readable only by the user in the profile's "idgbr" folder, and that file's path is stored. The client is
made fresh from the settings (`RemoteSettings.client`); the session's BackendManager hands it out instead of
starting a local service while "Use a remote backend" is ticked.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

from qgis.core import QgsApplication, QgsSettings
from qgis.PyQt.QtCore import QSettings

from .backend_client import (
    REMOTE_TIMEOUT_S,
    BackendError,
    RemoteBackendClient,
    read_token_file,
    remote_url_problem,
    token_problem,
)
from .i18n import tr

KEY_ENABLED = "idgbr/remote/enabled"
KEY_URL = "idgbr/remote/url"
KEY_TOKEN_FILE = "idgbr/remote/token_file"
KEY_CA_FILE = "idgbr/remote/ca_file"
KEYS = (KEY_ENABLED, KEY_URL, KEY_TOKEN_FILE, KEY_CA_FILE)
SETTINGS_PLACE = "Plugins ▸ IDGBR ▸ Settings… ▸ Remote backend"


def pasted_token_file() -> Path:
    """Where a token pasted in the settings dialog is kept: <profile>/idgbr/remote.token."""
    return Path(QgsApplication.qgisSettingsDirPath()) / "idgbr" / "remote.token"


def save_token(token: str, path: Optional[Path] = None) -> Path:
    """Write TOKEN to a file only this user can read (replacing it in one step); its path. OSError when the
    folder cannot be written."""
    target = path or pasted_token_file()
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    # Created with owner-only permissions from the start (POSIX); on Windows the profile folder is the user's.
    fd = os.open(str(temp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(token.strip() + "\n")
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return target


@dataclass
class RemoteSettings:
    """Whether jobs go to a remote `idgbr serve`, and how to reach it."""

    enabled: bool = False
    url: str = ""  # https://host:port
    token_file: str = ""  # a copy of the service's token file (or the file a pasted token was saved to)
    ca_file: str = ""  # the service's certificate when it is self-signed; empty: the system's trusted ones

    @classmethod
    def load(cls, settings: Optional[Any] = None) -> RemoteSettings:
        s = settings if settings is not None else _profile_settings()
        return cls(
            enabled=_bool(s.value(KEY_ENABLED, False)),
            url=str(s.value(KEY_URL, "") or "").strip(),
            token_file=str(s.value(KEY_TOKEN_FILE, "") or "").strip(),
            ca_file=str(s.value(KEY_CA_FILE, "") or "").strip(),
        )

    def save(self, settings: Optional[QgsSettings] = None) -> None:
        s = settings or QgsSettings()
        s.setValue(KEY_ENABLED, bool(self.enabled))
        s.setValue(KEY_URL, self.url.strip())
        s.setValue(KEY_TOKEN_FILE, self.token_file.strip())
        s.setValue(KEY_CA_FILE, self.ca_file.strip())

    def problem(self, token: str = "") -> Optional[str]:
        """Why these settings cannot reach a backend (before trying), or None. TOKEN: one typed in, instead of
        the token file."""
        url = remote_url_problem(self.url)
        if url:
            return tr("Remote backend: {problem}.").format(problem=url)
        if token.strip():
            why = token_problem(token.strip())
            if why:
                return tr("Remote backend: the token you entered cannot be right ({problem}): paste the whole "
                          "token, or choose the token file instead.").format(problem=why)
        elif not self.token_file:
            return tr("Remote backend: choose a copy of the service's token file (the file its --token-file "
                      "names), or paste the token.")
        elif not Path(self.token_file).is_file():
            return tr("Remote backend: the token file {file} does not exist: choose a copy of the service's token "
                      "file, or paste the token.").format(file=self.token_file)
        if self.ca_file and not Path(self.ca_file).is_file():
            return tr("Remote backend: the CA certificate {file} does not exist: choose the service's certificate "
                      "(its --tls-cert file), or clear the field to trust the system's certificates.").format(
                file=self.ca_file)
        return None

    def check_url(self) -> None:
        """BackendError when the URL cannot be a backend's address."""
        problem = remote_url_problem(self.url)
        if problem:
            raise BackendError(f"{problem} ({SETTINGS_PLACE})")

    def token(self) -> str:
        """The token from the token file; BackendError says how to fix a missing or empty one."""
        if not self.token_file:
            raise BackendError("no token file is set for the remote backend: choose a copy of the service's token "
                               f"file, or paste the token, in {SETTINGS_PLACE}")
        return read_token_file(self.token_file)

    def key(self, token: str) -> Tuple[str, str, str, str]:
        """What identifies the connection: a change of any of these makes a new client."""
        return (self.url, token, self.ca_file, self.token_file)

    def client(self, token: Optional[str] = None, request_timeout: float = REMOTE_TIMEOUT_S) -> RemoteBackendClient:
        """A client for these settings (not contacted yet); TOKEN, one typed in, overrides the token file's.
        BackendError names the setting at fault."""
        self.check_url()
        if token is None:
            token, source = self.token(), self.token_file
        else:
            token, source = token.strip(), "the settings dialog"
        return RemoteBackendClient(self.url, token, ca_file=self.ca_file or None, token_source=source,
                                   request_timeout=request_timeout)


def _profile_settings() -> Any:
    """QgsSettings, or the profile's own settings file when a standalone PyQGIS script has another one (as for
    the backend interpreter, `backend_process.configured_python`)."""
    settings = QgsSettings()
    profile_ini = Path(QgsApplication.qgisSettingsDirPath()) / "QGIS" / "QGIS3.ini"
    if settings.contains(KEY_ENABLED) or not profile_ini.is_file() or _same_file(Path(settings.fileName()),
                                                                                  profile_ini):
        return settings
    return QSettings(str(profile_ini), QSettings.IniFormat)


def _same_file(a: Path, b: Path) -> bool:
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))


def _bool(value: Any) -> bool:
    """QgsSettings gives back "true" / "false" strings on some platforms."""
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)
