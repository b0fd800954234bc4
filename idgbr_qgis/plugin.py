"""The plugin object QGIS loads: Processing provider, toolbar button and menu, clean unload."""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

from qgis.core import Qgis, QgsApplication, QgsMessageLog
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction, QDockWidget

from .backend_process import BackendManager
from .i18n import tr

MENU = "IDGBR"
ICON = Path(__file__).resolve().parent / "resources" / "icons" / "idgbr.svg"
LOG_TAG = "IDGBR"


class IdgbrPlugin:
    """Registers the provider (also in qgis_process, where ``iface`` is None) and, with a GUI, the dock."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.provider = None
        self.dock: Optional[Any] = None
        self.actions: List[QAction] = []

    # -------------------------------------------------------------------------------------------- lifecycle

    def initProcessing(self) -> None:  # noqa: N802 - QGIS API
        from .processing.provider import IdgbrProvider

        if self.provider is None:
            self.provider = IdgbrProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self) -> None:  # noqa: N802 - QGIS API
        self.initProcessing()
        if self.iface is None:
            return
        parent = self.iface.mainWindow()
        dock_action = QAction(QIcon(str(ICON)), tr("IDGBR"), parent)
        dock_action.setObjectName("idgbrOpenDock")
        dock_action.setToolTip(tr("IDGBR: refine class boundaries on a drawn extent"))
        dock_action.triggered.connect(self.show_dock)
        settings_action = QAction(QIcon(str(ICON)), tr("Settings…"), parent)
        settings_action.setObjectName("idgbrSettings")
        settings_action.triggered.connect(self.show_settings)
        self.iface.addToolBarIcon(dock_action)
        self.iface.addPluginToMenu(MENU, dock_action)
        self.iface.addPluginToMenu(MENU, settings_action)
        self.actions = [dock_action, settings_action]

    def unload(self) -> None:
        """Undo everything initGui and initProcessing did, and stop the backend service this session started."""
        if self.dock is not None:
            dock, self.dock = self.dock, None
            try:
                dock.shutdown()  # cancels its task and removes its map tool
            finally:
                if self.iface is not None and isinstance(dock, QDockWidget):
                    self.iface.removeDockWidget(dock)
                dock.deleteLater()
        if self.iface is not None:
            for action in self.actions:
                self.iface.removePluginMenu(MENU, action)
                self.iface.removeToolBarIcon(action)
                action.deleteLater()
        self.actions = []
        if self.provider is not None:
            # The registry owns (and deletes) the provider once removed.
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
        BackendManager.instance().shutdown()

    # ------------------------------------------------------------------------------------------------ GUI

    def show_dock(self) -> None:
        if self.dock is None:
            try:
                from .ui.dock import IdgbrDock
            except ImportError as exc:
                self._warn(tr("The IDGBR panel is not available in this installation ({reason}); reinstall the "
                              "plugin.").format(reason=exc))
                return
            self.dock = IdgbrDock(self.iface, BackendManager.instance())
            if isinstance(self.dock, QDockWidget):
                self.iface.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.dock.show()
        self.dock.raise_()

    def show_settings(self) -> None:
        try:
            from .ui.settings_dialog import SettingsDialog
        except ImportError as exc:
            self._warn(tr("The IDGBR settings are not available in this installation ({reason}); reinstall the "
                          "plugin.").format(reason=exc))
            return
        dialog = SettingsDialog(BackendManager.instance(), self.iface.mainWindow())
        dialog.exec_()

    def _warn(self, message: str) -> None:
        QgsMessageLog.logMessage(message, LOG_TAG, Qgis.Warning)
        if self.iface is not None:
            self.iface.messageBar().pushMessage(LOG_TAG, message, level=Qgis.Warning, duration=10)
