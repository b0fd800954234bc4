"""Shared fixtures of the plugin tests (pytest-qgis: a real, headless QGIS).

QGIS starts before any conftest is read, so `QT_QPA_PLATFORM=offscreen` must already be in the environment
(`make test` exports it). Fixtures here:

- ``sample_raster`` / ``sample_labels``: copies of the bundled sample (QGIS writes statistics beside the files
  it opens, and resources/ must stay clean);
- ``idgbr_provider``: the plugin's Processing provider registered (Processing initialised);
- ``idgbr_backend``: one backend service for the whole session, with its own temporary IDGBR_STATE_DIR,
  installed as the session's BackendManager and shut down at the end. Skips when the bundled model is absent;
- ``load_raster``: a raster layer from a path, checked valid.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

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
