"""`make package`: the ZIP installs into a QGIS profile's plugin folder and QGIS loads it from there, and it
meets the official plugin repository's rules (licence, metadata, permissions, no forbidden files)."""

from __future__ import annotations

import configparser
import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
QGIS_PROCESS = shutil.which("qgis_process.bin") or "/usr/bin/qgis_process.bin"


def _package_module():
    spec = importlib.util.spec_from_file_location("package_plugin", REPO_ROOT / "tools" / "package_plugin.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    if not any((REPO_ROOT / "resources" / "models").glob("*.safetensors")):
        pytest.skip("no bundled weights yet: the package would be refused")
    return _package_module().build(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def profile(package, tmp_path_factory) -> Path:
    """A fresh QGIS profile folder with the plugin unpacked and enabled, as 'Install from ZIP' leaves it."""
    root = tmp_path_factory.mktemp("qgis_profiles")
    default = root / "profiles" / "default"
    plugins = default / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(package) as archive:
        archive.extractall(plugins)
    (default / "QGIS").mkdir()
    (default / "QGIS" / "QGIS3.ini").write_text("[PythonPlugins]\nidgbr_qgis=true\n", encoding="utf-8")
    return root


def test_zip_name_and_content(package):
    metadata = configparser.ConfigParser(interpolation=None)
    metadata.read(REPO_ROOT / "metadata.txt", encoding="utf-8")
    assert package.name == f"idgbr_qgis-{metadata['general']['version']}.zip"
    with zipfile.ZipFile(package) as archive:
        names = archive.namelist()
        infos = {i.filename: i for i in archive.infolist()}
        assert all(n.startswith("idgbr_qgis/") for n in names)
        for needed in ("idgbr_qgis/__init__.py", "idgbr_qgis/metadata.txt", "idgbr_qgis/LICENSE",
                       "idgbr_qgis/ui/dock.py",
                       "idgbr_qgis/setup_env.py", "idgbr_qgis/backend_client.py",
                       "idgbr_qgis/backend/pyproject.toml", "idgbr_qgis/backend/idgbr/__init__.py",
                       "idgbr_qgis/resources/models/dubai5.safetensors", "idgbr_qgis/resources/icons/idgbr.svg"):
            assert needed in names, needed
        # The symlinks of the checkout are stored as real files with their content.
        assert archive.read("idgbr_qgis/metadata.txt") == (REPO_ROOT / "metadata.txt").read_bytes()
        assert not any((infos[n].external_attr >> 16) & 0o170000 == 0o120000 for n in names)
        assert not any("__pycache__" in n or n.endswith((".pyc", ".pyo")) for n in names)
        assert not any(".egg-info" in n or "/." in n for n in names)
        assert not any(n.endswith("_labels.tif") or "datasets" in n or "/tests/" in n for n in names)


def _fake_repo(root: Path, weights: bool = True) -> Path:
    """A small copy of the checkout (a stand-in weights file) that packages in a moment."""
    fake = root / "repo"
    shutil.copytree(REPO_ROOT / "idgbr_qgis", fake / "idgbr_qgis", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("metadata.txt", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, fake / name)
    shutil.copytree(REPO_ROOT / "resources" / "icons", fake / "resources" / "icons")
    if weights:
        (fake / "resources" / "models").mkdir()
        (fake / "resources" / "models" / "tiny.safetensors").write_bytes(b"\0" * 16)
    shutil.copytree(REPO_ROOT / "backend" / "idgbr", fake / "backend" / "idgbr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO_ROOT / "backend" / "pyproject.toml", fake / "backend" / "pyproject.toml")
    return fake


def test_refuses_a_tree_without_weights(tmp_path):
    module = _package_module()
    fake = _fake_repo(tmp_path, weights=False)
    with pytest.raises(module.PackageError, match="No model weights"):
        module.build(tmp_path / "dist", repo=fake)
    assert not list((tmp_path / "dist").glob("*.zip"))


def test_refuses_a_tree_without_a_licence(tmp_path):
    module = _package_module()
    fake = _fake_repo(tmp_path)
    (fake / "LICENSE").unlink()
    with pytest.raises(module.PackageError, match="LICENSE"):
        module.build(tmp_path / "dist", repo=fake)


def test_the_zip_ships_the_gpl_licence(package):
    licence = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "GNU GENERAL PUBLIC LICENSE" in licence and "Version 2, June 1991" in licence
    assert "How to Apply These Terms to Your New Programs" in licence  # the whole text, to its end
    with zipfile.ZipFile(package) as archive:
        assert archive.read("idgbr_qgis/LICENSE") == (REPO_ROOT / "LICENSE").read_bytes()


def test_entries_have_ordinary_permissions_whatever_the_checkout_has(tmp_path):
    # A checkout made with a strict umask, or on a file system that marks everything executable.
    module = _package_module()
    fake = _fake_repo(tmp_path)
    for path in sorted(fake.rglob("*"), reverse=True):
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() or path.suffix == ".py" else 0o600)
    target = module.build(tmp_path / "dist", repo=fake)
    with zipfile.ZipFile(target) as archive:
        infos = archive.infolist()
    files = [i for i in infos if not i.is_dir()]
    folders = [i for i in infos if i.is_dir()]
    assert files and all(i.external_attr >> 16 == stat.S_IFREG | 0o644 for i in files)
    assert {i.filename for i in folders} >= {"idgbr_qgis/", "idgbr_qgis/ui/", "idgbr_qgis/backend/idgbr/"}
    assert all(i.external_attr >> 16 == stat.S_IFDIR | 0o755 for i in folders)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644 or sys.platform.startswith("win")
    # And nothing else stands in the way of the plugin repository (the stand-in weights keep it small).
    assert module.publication_problems(target) == []


def test_metadata_meets_the_plugin_repository_rules(package):
    module = _package_module()
    fields = module.read_metadata(REPO_ROOT / "metadata.txt")
    assert module.metadata_problems(REPO_ROOT / "metadata.txt") == []
    # One project, one set of addresses: the tracker is the repository's, the home page the repository.
    repository = fields["repository"].rstrip("/")
    assert repository.startswith("https://")
    assert fields["tracker"].rstrip("/") == repository + "/issues"
    assert fields["homepage"].rstrip("/") == repository
    # The changelog has the coming release's entry above the released ones.
    changelog = fields["changelog"].splitlines()
    assert changelog[0].startswith("Unreleased") and any(line.startswith("0.1.0") for line in changelog)
    assert any("IDGBR_PYTHON" in line for line in changelog)
    # The bundled weights alone are above the repository's upload limit; `make package` warns about it.
    problems = [p for p in module.publication_problems(package) if "MB" not in p]
    assert problems == []


def test_qgis_loads_the_unpacked_plugin_provider_and_algorithms(profile):
    env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(profile), "QT_QPA_PLATFORM": "offscreen"}
    env.pop("QGIS_PLUGINPATH", None)
    listed = subprocess.run([QGIS_PROCESS, "list"], env=env, capture_output=True, text=True, timeout=300,
                            cwd=str(profile))
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "idgbr:refine" in listed.stdout and "idgbr:segment" in listed.stdout
    plugins = subprocess.run([QGIS_PROCESS, "plugins"], env=env, capture_output=True, text=True, timeout=300,
                             cwd=str(profile))
    assert "* idgbr_qgis" in plugins.stdout, plugins.stdout + plugins.stderr
    helped = subprocess.run([QGIS_PROCESS, "help", "idgbr:refine"], env=env, capture_output=True, text=True,
                            timeout=300, cwd=str(profile))
    assert helped.returncode == 0 and "INPUT" in helped.stdout and "COARSE" in helped.stdout


def test_unpacked_plugin_opens_its_dock_and_finds_its_backend_source(profile, tmp_path):
    """The GUI side from the unpacked copy (not the checkout): classFactory, initGui, the dock, unload."""
    plugins = profile / "profiles" / "default" / "python" / "plugins"
    script = tmp_path / "load.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(plugins)!r})
        from unittest.mock import MagicMock
        from qgis.core import QgsApplication
        from qgis.gui import QgsMapCanvas
        from qgis.PyQt.QtWidgets import QMainWindow
        app = QgsApplication([], True)
        app.initQgis()
        import idgbr_qgis
        from idgbr_qgis import setup_env
        assert idgbr_qgis.__file__.startswith({str(plugins)!r}), idgbr_qgis.__file__
        assert setup_env.backend_source_dir() == setup_env.plugin_dir() / "backend"
        import idgbr_qgis.backend_process as manager_module
        assert manager_module.__file__.endswith("backend_process.py"), manager_module.__file__
        window = QMainWindow()
        iface = MagicMock()
        iface.mainWindow.return_value = window
        iface.mapCanvas.return_value = QgsMapCanvas(window)
        plugin = idgbr_qgis.classFactory(iface)
        plugin.initGui()
        assert QgsApplication.processingRegistry().algorithmById("idgbr:refine") is not None
        from idgbr_qgis.ui.dock import IdgbrDock
        from idgbr_qgis.ui import config
        dock = IdgbrDock(iface, None)
        assert "dubai5" in config.bundled_models()
        dock.shutdown()
        plugin.unload()
        assert QgsApplication.processingRegistry().providerById("idgbr") is None
        print("LOADED OK")
    """), encoding="utf-8")
    env = {**os.environ, "QGIS_CUSTOM_CONFIG_PATH": str(profile), "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert "LOADED OK" in done.stdout, done.stdout + done.stderr
