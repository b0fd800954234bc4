"""The plugin object: light import, provider registration, toolbar and menu, and a clean unload."""

from __future__ import annotations

import subprocess
import sys
import types
from unittest.mock import MagicMock

import pytest
from qgis.core import QgsApplication
from qgis.PyQt.QtWidgets import QDockWidget

import idgbr_qgis
from idgbr_qgis import backend_client
from idgbr_qgis.backend_process import BackendManager

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def test_plugin_import_is_light():
    """QGIS imports the plugin at start-up: no torch, rasterio or backend package may come with it."""
    code = ("import sys; import idgbr_qgis, idgbr_qgis.plugin, idgbr_qgis.processing.provider; "
            "heavy = [m for m in ('torch', 'rasterio', 'idgbr', 'safetensors') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    completed = subprocess.run([sys.executable, "-c", code], cwd=str(REPO_ROOT), capture_output=True, text=True,
                               timeout=120)
    assert completed.returncode == 0, completed.stdout + completed.stderr


class FakeClient:
    """Stands in for a service this session started."""

    def __init__(self) -> None:
        self.process = object()
        self.stopped = False

    def health(self) -> dict:
        return {"service": "idgbr"}

    def shutdown(self) -> None:
        self.stopped = True


class FakeDock(QDockWidget):
    def __init__(self, iface, manager) -> None:
        super().__init__("IDGBR")
        self.manager = manager
        self.was_shut_down = False

    def shutdown(self) -> None:
        self.was_shut_down = True


@pytest.fixture
def plugin_env(monkeypatch, qgis_parent, qgis_processing):
    """A mock iface, a fake dock module and a manager whose service was 'started here'; restores the provider."""
    registry = QgsApplication.processingRegistry()
    had_provider = registry.providerById("idgbr") is not None
    if had_provider:
        registry.removeProvider("idgbr")
    client = FakeClient()
    monkeypatch.setattr(backend_client.BackendClient, "start_or_connect", classmethod(lambda cls, *a, **k: client))
    manager = BackendManager(locate=lambda: (REPO_ROOT / "python", "test"))
    previous = BackendManager.set_instance(manager)
    dock_module = types.ModuleType("idgbr_qgis.ui.dock")
    dock_module.IdgbrDock = FakeDock
    monkeypatch.setitem(sys.modules, "idgbr_qgis.ui.dock", dock_module)
    iface = MagicMock()
    iface.mainWindow.return_value = qgis_parent
    yield iface, manager, client
    BackendManager.set_instance(previous)
    if registry.providerById("idgbr") is not None:
        registry.removeProvider("idgbr")
    if had_provider:
        from idgbr_qgis.processing.provider import IdgbrProvider

        registry.addProvider(IdgbrProvider())


def test_load_open_dock_and_unload(plugin_env):
    iface, manager, client = plugin_env
    registry = QgsApplication.processingRegistry()
    plugin = idgbr_qgis.classFactory(iface)
    plugin.initGui()
    assert registry.algorithmById("idgbr:refine") is not None
    assert iface.addToolBarIcon.call_count == 1
    menus = [call.args for call in iface.addPluginToMenu.call_args_list]
    assert [(menu, action.text()) for menu, action in menus] == [("IDGBR", "IDGBR"), ("IDGBR", "Settings…")]

    iface.addToolBarIcon.call_args.args[0].trigger()  # the toolbar button opens the dock
    dock = plugin.dock
    assert isinstance(dock, FakeDock) and dock.manager is manager
    iface.addDockWidget.assert_called_once()

    manager.client()  # as if a run had started the service
    plugin.unload()
    assert registry.providerById("idgbr") is None
    assert dock.was_shut_down
    iface.removeDockWidget.assert_called_once_with(dock)
    assert iface.removePluginMenu.call_count == 2 and iface.removeToolBarIcon.call_count == 2
    assert client.stopped and not manager.is_connected()


def test_service_started_elsewhere_keeps_running(plugin_env):
    iface, manager, client = plugin_env
    client.process = None  # connected to a service another program started
    plugin = idgbr_qgis.classFactory(iface)
    plugin.initGui()
    manager.client()
    plugin.unload()
    assert not client.stopped and not manager.is_connected()


def test_processing_only_without_iface(plugin_env):
    """qgis_process calls classFactory(None) and initProcessing only."""
    plugin = idgbr_qgis.classFactory(None)
    plugin.initProcessing()
    assert QgsApplication.processingRegistry().providerById("idgbr") is not None
    plugin.unload()
    assert QgsApplication.processingRegistry().providerById("idgbr") is None


def test_missing_dock_module_is_reported(plugin_env, monkeypatch):
    iface, _manager, _client = plugin_env
    monkeypatch.setitem(sys.modules, "idgbr_qgis.ui.dock", None)  # import fails
    plugin = idgbr_qgis.classFactory(iface)
    plugin.initGui()
    plugin.show_dock()
    assert plugin.dock is None
    assert "reinstall" in iface.messageBar().pushMessage.call_args.args[1]
    plugin.unload()


def test_dead_service_is_replaced_on_next_use(monkeypatch):
    first, second = FakeClient(), FakeClient()
    clients = iter([first, second])
    monkeypatch.setattr(backend_client.BackendClient, "start_or_connect",
                        classmethod(lambda cls, *a, **k: next(clients)))
    manager = BackendManager(locate=lambda: (REPO_ROOT / "python", "test"))
    assert manager.client() is first
    assert manager.client() is first  # alive: reused

    def gone() -> dict:
        raise backend_client.ServiceGone("the backend service stopped")

    first.health = gone
    assert manager.client() is second
    manager.shutdown()
    assert second.stopped and not first.stopped


def test_the_service_is_started_with_this_qgis_as_its_parent(monkeypatch):
    """So the service stops by itself when this QGIS dies (`idgbr serve --parent-pid`)."""
    import os

    calls = []

    def start(cls, *args, **kwargs):
        calls.append(kwargs)
        return FakeClient()

    monkeypatch.setattr(backend_client.BackendClient, "start_or_connect", classmethod(start))
    manager = BackendManager(locate=lambda: (REPO_ROOT / "python", "test"))
    manager.client()
    assert calls and calls[0]["parent_pid"] == os.getpid()
    manager.shutdown()


def test_the_client_passes_the_parent_pid_to_the_service(monkeypatch, tmp_path):
    commands = []

    class Started(Exception):
        pass

    def popen(command, **kwargs):
        commands.append(command)
        raise Started

    monkeypatch.setattr(backend_client.subprocess, "Popen", popen)
    with pytest.raises(Started):
        backend_client.BackendClient._spawn(sys.executable, tmp_path, 1.0, 0, None, 60.0, parent_pid=4321)
    assert commands[0][-2:] == ["--parent-pid", "4321"]
