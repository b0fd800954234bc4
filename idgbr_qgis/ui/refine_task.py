"""The dock's background run: a QgsTask that sends the job(s) to the backend service and waits for them.

Runs in QGIS's task manager (progress shown there, cancellable); never touches layers or widgets from the
worker thread: the dock adds the result layers in the main thread when `finished` reports success.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from qgis.core import QgsCoordinateTransformContext, QgsProcessingException, QgsRectangle, QgsTask
from qgis.PyQt.QtCore import pyqtSignal

from ..processing import sources

Extent = Tuple[float, float, float, float]
# Progress shares: service start, the coarse pass (bundled model), the refiner.
_START_SHARE = 5.0
_COARSE_SHARE = 20.0
_POLL_S = 0.1  # the job's state is polled this often: it bounds the latency a small extent adds


@dataclass
class RunRequest:
    """Everything the worker needs, read from layers and widgets in the main thread."""

    layer_name: str
    source: sources.RasterSource
    output: Path  # the refined class map
    coarse_output: Optional[Path]  # where the bundled model's coarse map goes (None: coarse layer given)
    coarse: Optional[sources.RasterSource] = None  # an existing class layer instead of the bundled model
    extent: Optional[Extent] = None
    extent_crs: Optional[str] = None
    extent_layer_crs: Optional[QgsRectangle] = None  # the extent in the layer's CRS, for copying non-file layers
    model: str = "dubai5"
    device: str = "auto"
    steps: Optional[int] = None
    band: Optional[int] = None  # px; -1 = rule off; None = the model card's
    vocabulary: Optional[int] = None  # px; -1 = rule off; None = the model card's
    min_confidence: Optional[float] = None  # 0..1; 0 = gate off; None = the model card's
    confidence: Optional[Path] = None  # where the refiner's confidence goes (None: not wanted)
    pixel_size_m: float = 0.5  # ground pixel of copies of web / virtual layers (the model's)
    input_pixel_size: Optional[float] = None  # the input's metres per pixel for the backend; None: its CRS
    transform_context: QgsCoordinateTransformContext = field(default_factory=QgsCoordinateTransformContext)


@dataclass
class RunOutcome:
    """What the run produced; `error` is a user-facing message, `cancelled` a user's cancel."""

    refined: Optional[Path] = None
    coarse: Optional[Path] = None
    confidence: Optional[Path] = None
    classes: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    device: str = ""
    seconds: float = 0.0
    error: str = ""
    setup_needed: bool = False  # no backend interpreter: offer the first-run setup
    cancelled: bool = False


class RefineTask(QgsTask):
    """Coarse pass (when no coarse layer is given) then the refiner, as backend jobs."""

    #: a line for the dock's status label, emitted from the worker thread (delivered queued)
    statusChanged = pyqtSignal(str)

    def __init__(self, manager: Any, request: RunRequest,
                 on_done: Optional[Callable[[RefineTask, RunOutcome], None]] = None) -> None:
        super().__init__(f"IDGBR refine: {request.layer_name}", QgsTask.CanCancel)
        self.manager = manager
        self.request = request
        self.outcome = RunOutcome()
        self.on_done = on_done
        self._scratch: Optional[tempfile.TemporaryDirectory] = None

    # --------------------------------------------------------------------------------------- worker thread
    def run(self) -> bool:
        started = time.monotonic()
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - any failure must end as a message, never a crash in a thread
            self.outcome.error = self.outcome.error or f"Unexpected error: {type(exc).__name__}: {exc}"
        self.outcome.seconds = time.monotonic() - started
        if self.isCanceled():
            self.outcome.cancelled = True
        ok = not self.outcome.error and not self.outcome.cancelled
        if not ok:
            self._discard_outputs()
        return ok

    def _run(self) -> None:
        from ..backend import BackendUnavailable
        from ..backend_client import BackendError, JobCancelled

        request = self.request
        self._status("Connecting to the IDGBR backend…")
        self.setProgress(1)
        try:
            client = self.manager.client()
        except BackendUnavailable as exc:
            self.outcome.error = str(exc)
            self.outcome.setup_needed = True
            return
        except BackendError as exc:
            self.outcome.error = f"The IDGBR backend could not start: {exc}"
            self.outcome.setup_needed = True  # a broken interpreter is fixed by the setup too
            return
        if self.isCanceled():
            return
        self.setProgress(_START_SHARE)
        try:
            input_path = self._readable(request.source, "input.tif")
            coarse_path = self._readable(request.coarse, "coarse_input.tif") if request.coarse else None
        except QgsProcessingException as exc:
            self.outcome.error = exc.args[0] if exc.args else str(exc)
            return
        if self.isCanceled():
            return
        common: Dict[str, Any] = {
            "input": str(input_path),
            "model": request.model,
            "device": request.device,
        }
        if request.input_pixel_size is not None and not request.source.needs_copy:
            common["pixel_size"] = request.input_pixel_size  # a copy has its own, known pixel size
        if request.extent is not None:
            common["extent"] = list(request.extent)
            if request.extent_crs:
                common["extent_crs"] = request.extent_crs
        # The coarse map is made first and handed to the refiner (the segmenter then runs once). A raster
        # without CRS is the exception: the engine cannot match a window of it to the full grid, so the
        # refiner makes its own coarse map and the comparison copy is made afterwards.
        coarse_first = coarse_path is None and request.coarse_output is not None and request.source.crs.isValid()
        coarse_last = coarse_path is None and request.coarse_output is not None and not coarse_first
        try:
            refine_from, refine_to = _START_SHARE, 100.0
            if coarse_first:
                self._status("Coarse segmentation…")
                self._segment(client, common, _START_SHARE, _START_SHARE + _COARSE_SHARE)
                coarse_path = request.coarse_output
                refine_from = _START_SHARE + _COARSE_SHARE
            elif coarse_last:
                refine_to = 100.0 - _COARSE_SHARE
            if self.isCanceled():
                return
            self._status("Refining boundaries…")
            fields = {**common, "mode": "refine", "output": str(request.output)}
            if coarse_path is not None:
                fields["coarse"] = str(coarse_path)
            for name in ("steps", "band", "vocabulary", "min_confidence"):
                if getattr(request, name) is not None:
                    fields[name] = getattr(request, name)
            if request.confidence is not None:
                fields["confidence"] = str(request.confidence)
            status = self._job(client, fields, refine_from, refine_to)
            if coarse_last:
                if self.isCanceled():
                    return
                self._status("Coarse map for comparison…")
                self._segment(client, common, refine_to, 100.0)
        except JobCancelled:
            self.outcome.cancelled = True
            return
        except BackendError as exc:
            self.outcome.error = _backend_message(exc)
            return
        self.outcome.refined = request.output
        self.outcome.confidence = request.confidence
        result = status.get("result") if isinstance(status.get("result"), dict) else {}
        classes = result.get("classes")
        self.outcome.classes = [dict(c) for c in classes if isinstance(c, dict)] if isinstance(classes, list) else []
        self.outcome.notes = [str(n) for n in result.get("notes") or []]
        self.outcome.device = str(result.get("device") or "")
        self.setProgress(100)

    def _segment(self, client: Any, common: Dict[str, Any], low: float, high: float) -> None:
        assert self.request.coarse_output is not None
        self._job(client, {**common, "mode": "segment", "output": str(self.request.coarse_output)}, low, high)
        self.outcome.coarse = self.request.coarse_output

    def _job(self, client: Any, fields: Dict[str, Any], low: float, high: float) -> Dict[str, Any]:
        job_id = client.submit(**fields)

        def progress(percent: float, message: str = "") -> None:
            self.setProgress(low + (high - low) * max(0.0, min(100.0, float(percent))) / 100.0)
            if message:
                self._status(message)

        return client.wait(job_id, on_progress=progress, is_cancelled=self.isCanceled, poll=_POLL_S)

    def _readable(self, source: Optional[sources.RasterSource], name: str) -> Optional[Path]:
        """The file the backend reads: the layer's own, or a GeoTIFF copy of the extent (web/virtual layers)."""
        if source is None:
            return None
        if not source.needs_copy:
            return source.path
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="idgbr_dock_")
        self._status(f"Copying '{source.name}' to a GeoTIFF the backend can read…")
        return sources.export(source, Path(self._scratch.name) / name, self.request.extent_layer_crs,
                              self.request.pixel_size_m, self.request.transform_context)

    def _status(self, text: str) -> None:
        self.statusChanged.emit(text)

    def _discard_outputs(self) -> None:
        # The coarse map of a run whose refine failed goes too; and a backend killed while writing cannot
        # remove its hidden temporary file (".<name>.<random>.tmp…" beside the output), so it is removed here.
        for path in (self.request.output, self.request.confidence, self.request.coarse_output):
            if path is None:
                continue
            leftovers = [path, path.with_name(path.name + ".aux.xml"), *path.parent.glob(f".{path.name}.*")]
            for file in leftovers:
                with contextlib.suppress(OSError):
                    file.unlink()
        self.outcome.refined = self.outcome.coarse = self.outcome.confidence = None

    # ----------------------------------------------------------------------------------------- main thread
    def finished(self, result: bool) -> None:  # noqa: ARG002 - the outcome carries the details
        if not self.outcome.error and not self.outcome.cancelled and self.outcome.refined is None:
            # Cancelled before run() started (QGIS then skips run()).
            self.outcome.cancelled = True
        if self._scratch is not None:
            with contextlib.suppress(OSError):
                self._scratch.cleanup()
            self._scratch = None
        callback, self.on_done = self.on_done, None
        if callback is not None:
            callback(self, self.outcome)


def _backend_message(exc: Exception) -> str:
    """The backend's message without the HTTP wrapping, plus what happens next when the service died."""
    from ..backend_client import ServiceGone

    text = str(exc)
    prefix = "failed with HTTP "
    if prefix in text and ": " in text:
        text = text.split(": ", 1)[1]
    if isinstance(exc, ServiceGone):
        return f"The IDGBR backend stopped during the run: {text}"
    return text
