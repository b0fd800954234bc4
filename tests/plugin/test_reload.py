"""Unload and reload the plugin inside one running QGIS, the way QGIS's Plugin Manager (and Plugin Reloader)
does through `qgis.utils`: provider removed, dock and map tool gone, the backend service it started stopped.

Runs in its own QGIS process: reloading drops the plugin's modules from `sys.modules`, which must not leak
into the other tests of this session.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from idgbr_qgis.backend_process import development_python

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from unittest.mock import MagicMock

    from qgis.core import QgsApplication
    from qgis.gui import QgsMapCanvas, QgsMessageBar, QgsRubberBand
    from qgis.PyQt import sip
    from qgis.PyQt.QtCore import QCoreApplication, QEvent
    from qgis.PyQt.QtWidgets import QApplication, QMainWindow

    app = QgsApplication([], True)
    app.initQgis()
    sys.path.append(os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))  # QGIS's own plugins
    import qgis.utils

    window = QMainWindow()
    canvas = QgsMapCanvas(window)
    bar = QgsMessageBar(window)
    iface = MagicMock()
    iface.mainWindow.return_value = window
    iface.mapCanvas.return_value = canvas
    iface.messageBar.return_value = bar
    qgis.utils.iface = iface
    qgis.utils.plugin_paths = [REPO]
    sys.path.insert(0, REPO)  # QGIS puts its plugin folders on sys.path the same way
    qgis.utils.updateAvailablePlugins()
    registry = QgsApplication.processingRegistry()
    report = {}

    def wait(condition, timeout):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            QApplication.processEvents()
            time.sleep(0.02)
        return True

    def flush_deletes():
        for _ in range(3):
            QCoreApplication.sendPostedEvents(None, QEvent.DeferredDelete)
            QApplication.processEvents()

    def bands():
        return sum(isinstance(item, QgsRubberBand) for item in canvas.scene().items())

    def open_dock_and_start_service(tag):
        plugin = qgis.utils.plugins["idgbr_qgis"]
        plugin.show_dock()
        dock = plugin.dock
        dock.start_drawing()
        report[tag + "_tool_active"] = canvas.mapTool() is dock.tool
        report[tag + "_bands"] = bands()
        # Showing the dock starts the backend in a task; wait until it reports its device.
        report[tag + "_health"] = wait(lambda: dock.deviceLabel.text().startswith("Device: ")
                                       and "starting" not in dock.deviceLabel.text(), 180)
        report[tag + "_device"] = dock.deviceLabel.text()
        client = plugin_manager().client()
        return dock, client

    def plugin_manager():
        return sys.modules["idgbr_qgis.backend_process"].BackendManager.instance()

    def after_unload(tag, dock, client):
        flush_deletes()
        report[tag + "_provider_removed"] = registry.providerById("idgbr") is None
        report[tag + "_algorithm_removed"] = registry.algorithmById("idgbr:refine") is None
        report[tag + "_dock_deleted"] = sip.isdeleted(dock)
        report[tag + "_dock_removed"] = any(c.args[0] is dock for c in iface.removeDockWidget.call_args_list)
        report[tag + "_tool_gone"] = canvas.mapTool() is None
        report[tag + "_bands_left"] = bands()
        report[tag + "_service_stopped"] = client.process is not None and client.process.poll() is not None
        report[tag + "_state_forgotten"] = not (Path(os.environ["IDGBR_STATE_DIR"]) / "service.json").exists()

    from pathlib import Path
    assert qgis.utils.loadPlugin("idgbr_qgis") and qgis.utils.startPlugin("idgbr_qgis")
    report["loaded"] = registry.algorithmById("idgbr:refine") is not None
    dock, client = open_dock_and_start_service("first")
    first_pid = client.pid

    # qgis.utils.reloadPlugin's own steps, checked in between: unload, then load and start again.
    old_module = sys.modules["idgbr_qgis"]
    report["unloaded_once"] = qgis.utils.unloadPlugin("idgbr_qgis")
    after_unload("reload", dock, client)
    report["reloaded"] = qgis.utils.loadPlugin("idgbr_qgis") and qgis.utils.startPlugin("idgbr_qgis")
    report["fresh_modules"] = sys.modules["idgbr_qgis"] is not old_module
    report["reload_provider_back"] = registry.algorithmById("idgbr:refine") is not None

    dock, client = open_dock_and_start_service("second")
    report["new_service"] = client.pid != first_pid
    # And the one-call reload QGIS's Plugin Reloader uses.
    report["reload_call"] = qgis.utils.reloadPlugin("idgbr_qgis")
    flush_deletes()
    report["reload_call_dock_deleted"] = sip.isdeleted(dock)
    report["reload_call_service_stopped"] = client.process is not None and client.process.poll() is not None
    dock, client = open_dock_and_start_service("third")
    report["unloaded"] = qgis.utils.unloadPlugin("idgbr_qgis")
    after_unload("final", dock, client)
    print("REPORT " + json.dumps(report))
    app.exitQgis()
    """
)


def test_unload_and_reload_without_restarting_qgis(tmp_path, bundled_model):
    script = tmp_path / "reload.py"
    script.write_text(f"REPO = {str(REPO_ROOT)!r}\n" + SCRIPT, encoding="utf-8")
    state = tmp_path / "state"
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(tmp_path / "profile"),  # no IDGBR settings from the developer's profile
        "IDGBR_STATE_DIR": str(state),
        "IDGBR_PYTHON": str(development_python()),
    }
    import subprocess

    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    expected_true = [
        "loaded", "first_tool_active", "first_health", "unloaded_once", "reloaded", "reload_provider_removed",
        "reload_algorithm_removed", "reload_dock_deleted", "reload_dock_removed", "reload_tool_gone",
        "reload_service_stopped", "reload_state_forgotten", "fresh_modules", "reload_provider_back",
        "second_tool_active", "second_health", "new_service", "reload_call", "reload_call_dock_deleted",
        "reload_call_service_stopped", "third_health", "unloaded", "final_provider_removed",
        "final_dock_deleted", "final_tool_gone", "final_service_stopped",
    ]
    failed = [key for key in expected_true if report.get(key) is not True]
    assert not failed, (failed, report, done.stderr[-3000:])
    assert report["first_device"].startswith("Device: ")
    assert report["first_bands"] >= 1 and report["reload_bands_left"] == 0 and report["final_bands_left"] == 0


@pytest.fixture
def bundled_model():
    if not any((REPO_ROOT / "resources" / "models").glob("*.safetensors")):
        pytest.skip("the bundled model is not present yet")
