"""The dock's background run: a QgsTask around the plugin's job runner (`idgbr_qgis.jobs`).

Runs in QGIS's task manager (progress shown there, cancellable); never touches layers or widgets from the
worker thread: the dock adds the result layers in the main thread when `finished` reports the end.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from qgis.core import QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..i18n import tr
from ..jobs.outcome import JobCancelled, JobError, JobResult
from ..jobs.runner import JobRunner
from ..jobs.spec import JobSpec


class RefineTask(QgsTask):
    """One dock run. When it ends, exactly one of ``result``, ``error`` and ``cancelled`` tells how."""

    #: a line for the dock's status label, emitted from the worker thread (delivered queued)
    statusChanged = pyqtSignal(str)

    def __init__(self, manager: Any, spec: JobSpec, layer_name: str,
                 on_done: Optional[Callable[[RefineTask], None]] = None) -> None:
        super().__init__(tr("IDGBR refine: {name}").format(name=layer_name), QgsTask.CanCancel)
        self.manager = manager
        self.spec = spec
        self.layer_name = layer_name
        self.on_done = on_done
        self.result: Optional[JobResult] = None
        self.error: Optional[JobError] = None
        self.cancelled = False

    # --------------------------------------------------------------------------------------- worker thread
    def run(self) -> bool:
        runner = JobRunner(self.manager, on_progress=self._progress, on_step=self.statusChanged.emit,
                           is_cancelled=self.isCanceled)
        try:
            self.result = runner.run(self.spec)
        except JobCancelled:
            self.cancelled = True
        except JobError as exc:
            self.error = exc
        except Exception as exc:  # noqa: BLE001 - any failure must end as a message, never a crash in a thread
            self.error = JobError(tr("Unexpected error: {kind}: {reason}").format(kind=type(exc).__name__,
                                                                                  reason=exc))
        return self.result is not None

    def _progress(self, percent: float, message: str) -> None:
        self.setProgress(percent)
        if message:
            self.statusChanged.emit(message)

    # ----------------------------------------------------------------------------------------- main thread
    def finished(self, result: bool) -> None:  # noqa: ARG002 - the task's fields carry the details
        if self.result is None and self.error is None:
            self.cancelled = True  # also when cancelled before run() started (QGIS then skips run())
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback(self)
