"""Shared fixtures of the plugin tests (pytest-qgis: a real, headless QGIS).

QGIS starts before any conftest is read, so `QT_QPA_PLATFORM=offscreen` must already be in the environment
(`make test` exports it). Fixtures here:

- ``sample_raster`` / ``sample_labels``: copies of the bundled sample (QGIS writes statistics beside the files
  it opens, and resources/ must stay clean);
- ``idgbr_provider``: the plugin's Processing provider registered (Processing initialised);
- ``idgbr_backend``: one backend service for the whole session, with its own temporary IDGBR_STATE_DIR,
  installed as the session's BackendManager and shut down at the end. Skips when the bundled model is absent;
- ``load_raster``: a raster layer from a path, checked valid;
- ``remote_service``: a real `idgbr serve` over HTTPS with a self-signed certificate for 127.0.0.1 (the remote
  backend of the tests), and ``remote_settings``: a function that sets the plugin's remote backend settings,
  restored after the test.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import ssl
import subprocess
import sys
import threading
import types
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # `idgbr_qgis` is imported from the checkout, as QGIS would

# For QGIS subprocesses (qgis_process) started by the tests; this process's QGIS is already running.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from qgis.core import QgsApplication, QgsRasterLayer  # noqa: E402

from idgbr_qgis.backend_process import BackendManager, development_python  # noqa: E402

SAMPLE_DIR = REPO_ROOT / "resources" / "sample"
MODELS_DIR = Path(os.environ.get("IDGBR_MODELS_DIR") or REPO_ROOT / "resources" / "models")
DEFAULT_MODEL = MODELS_DIR / "dubai5.safetensors"


@pytest.fixture(scope="session")
def sample_copy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sample")
    for name in ("dubai_sample.tif", "dubai_sample_labels.tif"):
        shutil.copy2(SAMPLE_DIR / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def sample_raster(sample_copy_dir: Path) -> Path:
    """1000 × 1000 px, 3-band uint8, EPSG:32640, 0.5 m pixels, upper-left corner (320000, 2790000)."""
    return sample_copy_dir / "dubai_sample.tif"


@pytest.fixture(scope="session")
def sample_labels(sample_copy_dir: Path) -> Path:
    """The sample's class ids (dubai5 ids 0-4, 255 = unlabelled/nodata), same grid as the sample."""
    return sample_copy_dir / "dubai_sample_labels.tif"


@pytest.fixture(scope="session")
def idgbr_provider(qgis_processing: None) -> Iterator[object]:
    """The IDGBR provider in the Processing registry for the session (the plugin's own class)."""
    from idgbr_qgis.processing.provider import IdgbrProvider

    registry = QgsApplication.processingRegistry()
    provider = registry.providerById("idgbr")
    added = provider is None
    if added:
        provider = IdgbrProvider()
        assert registry.addProvider(provider)
    yield provider
    if added and registry.providerById("idgbr") is not None:
        registry.removeProvider("idgbr")


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"the bundled model is not present yet: {DEFAULT_MODEL}")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def idgbr_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private IDGBR_STATE_DIR (service record, token, log) for the session, also seen by subprocesses."""
    folder = tmp_path_factory.mktemp("idgbr_state")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IDGBR_STATE_DIR", str(folder))
        patch.setenv("IDGBR_PYTHON", str(development_python()))
        yield folder


@pytest.fixture(scope="session")
def idgbr_backend(idgbr_state_dir: Path, bundled_model: Path) -> Iterator[BackendManager]:
    """The session's backend service, started once, used by the algorithms and the dock, stopped at the end."""
    python = development_python()
    manager = BackendManager(state_dir=idgbr_state_dir, timeout=120.0, locate=lambda: (python, "the tests"))
    previous = BackendManager.set_instance(manager)
    try:
        manager.client()  # start now, so that the first test does not pay for it in its own timing
        yield manager
    finally:
        manager.shutdown()
        BackendManager.set_instance(previous)


@pytest.fixture
def load_raster() -> Callable[..., QgsRasterLayer]:
    def load(path: Path | str, name: str = "raster", provider: str = "gdal") -> QgsRasterLayer:
        layer = QgsRasterLayer(str(path), name, provider)
        assert layer.isValid(), f"QGIS cannot open {path}"
        return layer

    return load


# ----------------------------------------------------------------------------------------------------------------
# A remote backend: `idgbr serve` over HTTPS on 127.0.0.1 (as tests/backend/test_remote.py starts it)
# ----------------------------------------------------------------------------------------------------------------
READY = "IDGBR READY port="
# Variables of QGIS's own Python and GDAL, which would break the backend's (see backend_client._FOREIGN_ENV).
FOREIGN_ENV = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONEXECUTABLE", "GDAL_DATA", "GDAL_DRIVER_PATH",
               "PROJ_LIB", "PROJ_DATA")


class RemoteService:
    """An HTTPS `python -m idgbr serve` child process with its token file, certificate and scratch folder."""

    def __init__(self, folder: Path, python: Path, tls: types.SimpleNamespace) -> None:
        self.ca = tls.cert
        self.token_file = folder / "token"
        self.scratch = folder / "scratch"
        self.log = folder / "serve.log"
        env = {k: v for k, v in os.environ.items() if k.upper() not in FOREIGN_ENV}
        env.update({"IDGBR_STATE_DIR": str(folder / "state"), "PYTHONUNBUFFERED": "1"})
        with open(self.log, "wb") as err:
            self.process = subprocess.Popen(
                [str(python), "-m", "idgbr", "serve", "--port", "0", "--token-file", str(self.token_file),
                 "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--scratch-dir", str(self.scratch)],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=str(folder))
        lines: queue.Queue[str] = queue.Queue()
        stdout = self.process.stdout
        assert stdout is not None
        threading.Thread(target=lambda: lines.put(stdout.readline().decode()), daemon=True).start()
        try:
            ready = lines.get(timeout=180).strip()
        except queue.Empty:
            self.process.kill()
            raise AssertionError(f"no ready line; log: {self.log.read_text()}") from None
        assert ready.startswith(READY), f"{ready!r}; log: {self.log.read_text()}"
        self.port = int(ready[len(READY):].split()[0])
        self.url = f"https://127.0.0.1:{self.port}"
        self.token = self.token_file.read_text().strip()

    def files(self) -> List[Path]:
        """Every file in the service's scratch folder (uploads, job folders)."""
        return sorted(p for p in self.scratch.rglob("*") if p.is_file()) if self.scratch.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            request = urllib.request.Request(self.url + "/shutdown", data=b"", method="POST",
                                             headers={"Authorization": f"Bearer {self.token}"})
            context = ssl.create_default_context(cafile=str(self.ca))
            try:
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                     urllib.request.HTTPSHandler(context=context))
                json.loads(opener.open(request, timeout=30).read() or b"{}")
                self.process.wait(timeout=30)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture(scope="session")
def remote_service(tmp_path_factory: pytest.TempPathFactory, bundled_model: Path,
                   certificate_maker: Callable) -> Iterator[RemoteService]:
    """A remote backend for the session: HTTPS on 127.0.0.1, self-signed certificate, token in a file."""
    folder = tmp_path_factory.mktemp("remote_backend")
    service = RemoteService(folder, development_python(), certificate_maker(folder))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture
def remote_settings() -> Iterator[Callable[..., None]]:
    """set(enabled=True, url=..., token_file=..., ca_file=...): the plugin's remote backend settings, as the
    settings dialog stores them; the previous values come back after the test."""
    from qgis.core import QgsSettings

    from idgbr_qgis.remote_config import KEYS, RemoteSettings

    settings = QgsSettings()
    saved = {key: settings.value(key, None) for key in KEYS}

    def apply(enabled: bool = True, url: str = "", token_file: Optional[Path] = None,
              ca_file: Optional[Path] = None) -> None:
        RemoteSettings(enabled=enabled, url=url, token_file=str(token_file or ""),
                       ca_file=str(ca_file or "")).save(settings)

    yield apply
    for key, value in saved.items():
        if value is None:
            settings.remove(key)
        else:
            settings.setValue(key, value)
