"""How a job runs: the backend service through its client, with progress, status lines and cancel.

`JobRunner.run` works in a worker thread (a Processing algorithm's, or a QgsTask's): it connects to the
service, makes the layers readable (`jobs.inputs`), runs the coarse pass when the coarse map is kept, the
job itself and the changed pixels, and removes what a failed or cancelled run wrote. With a remote backend
(Settings ▸ Remote backend) each backend job goes through `jobs.remote`, which sends the files up and brings the
results back to the same paths; everything else here is the same.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional
from urllib.parse import urlsplit

from ..backend_client import BackendError
from ..backend_client import JobCancelled as BackendCancelled
from ..backend_process import BackendUnavailable, RemoteUnavailable
from ..i18n import tr
from . import inputs, remote
from .changes import write_changes
from .outcome import JobCancelled, JobError, JobResult, backend_failure, connection_failure, job_classes
from .spec import DEFAULT_PIXEL_SIZE_M, JobSpec

# Progress shares of a run: connecting, then the coarse pass when it runs as its own job.
START_SHARE = 5.0
COARSE_SHARE = 20.0
POLL_S = 0.1  # the job's state is polled this often: it bounds the latency a small extent adds

Progress = Callable[[float, str], None]  # (percent 0-100 of the whole run, the backend's message or "")


def _nothing(*_args: Any) -> None:
    return None


class JobRunner:
    """Runs JobSpecs with the session's backend (a BackendManager, or anything with ``client()``)."""

    def __init__(self, manager: Any, *, on_progress: Progress = _nothing, on_step: Callable[[str], None] = _nothing,
                 is_cancelled: Callable[[], bool] = lambda: False, scratch_dir: Optional[Path] = None) -> None:
        self.manager = manager
        self.on_progress = on_progress
        self.on_step = on_step  # a line for each step of the run ("Refining boundaries…")
        self.is_cancelled = is_cancelled
        self.scratch_dir = scratch_dir  # where copies of layers go (None: the system's temporary folder)

    def run(self, spec: JobSpec) -> JobResult:
        """Run ``spec``; raises JobError (a message for the user) or JobCancelled, leaving no new file behind."""
        started = time.monotonic()
        existing = {path for path in spec.outputs if path.exists()}  # a failed run must not remove these
        try:
            with tempfile.TemporaryDirectory(prefix="idgbr_", dir=self.scratch_dir) as scratch:
                result = self._run(spec, Path(scratch))
        except BackendCancelled as exc:
            self._discard(spec, existing)
            raise JobCancelled(tr("Cancelled: no output was written.")) from exc
        except BackendError as exc:
            self._discard(spec, existing)
            raise backend_failure(exc) from exc
        except (JobError, JobCancelled):
            self._discard(spec, existing)
            raise
        if self.is_cancelled():
            # Cancelled after the last job ended: what it wrote goes too, as the user asked.
            self._discard(spec, existing)
            raise JobCancelled(tr("Cancelled: no output was written."))
        result.seconds = time.monotonic() - started
        self.on_progress(100.0, "")
        return result

    def _run(self, spec: JobSpec, scratch: Path) -> JobResult:
        self.on_step(tr("Connecting to the IDGBR backend…"))
        self.on_progress(1.0, "")
        client = self._client()
        self._check_cancel()
        self.on_progress(START_SHARE, "")
        card = model_card(client, spec.model)
        copy_pixel = spec.copy_pixel_size_m or float(card.get("pixel_size_m") or DEFAULT_PIXEL_SIZE_M)
        input_path = self._readable(spec, spec.input, scratch / "input.tif", copy_pixel, margin=0.0)
        coarse_path = None
        if spec.coarse is not None:
            # A margin: the input's window snaps outwards to its own pixels, so the copy must reach beyond it.
            coarse_path = self._readable(spec, spec.coarse, scratch / "coarse.tif", copy_pixel, margin=0.1)
        self._check_cancel()
        common = {**spec.job_fields(), "input": str(input_path)}

        # The kept coarse map is made first and handed to the refiner (the segmenter then runs once). A raster
        # without CRS is the exception: the backend cannot place a window of it on the full grid, so the
        # refiner makes its own coarse map and the kept copy is made afterwards.
        keep_coarse = spec.mode == "refine" and coarse_path is None and spec.coarse_output is not None
        coarse_first = keep_coarse and spec.input.crs.isValid()
        low, high = START_SHARE, 100.0
        if coarse_first:
            self.on_step(tr("Coarse segmentation…"))
            self._job(client, {**common, "mode": "segment", "output": str(spec.coarse_output)},
                      low, low + COARSE_SHARE)
            coarse_path, low = spec.coarse_output, low + COARSE_SHARE
        elif keep_coarse:
            high = 100.0 - COARSE_SHARE
        if spec.changes is not None:
            high -= 2.0
        self._check_cancel()

        fields: Dict[str, Any] = {**common, "mode": spec.mode, "output": str(spec.output)}
        if spec.mode == "refine":
            self.on_step(tr("Refining boundaries…"))
            fields.update(spec.refine_fields())
            if coarse_path is not None:
                fields["coarse"] = str(coarse_path)
        else:
            self.on_step(tr("Segmenting…"))
        status = self._job(client, fields, low, high)
        if keep_coarse and not coarse_first:
            self._check_cancel()
            self.on_step(tr("Coarse map for comparison…"))
            self._job(client, {**common, "mode": "segment", "output": str(spec.coarse_output)},
                      high, 100.0 - (2.0 if spec.changes is not None else 0.0))
            coarse_path = spec.coarse_output
        if spec.changes is not None and coarse_path is not None:
            self._check_cancel()
            self.on_step(tr("Marking the changed pixels…"))
            write_changes(spec.output, coarse_path, spec.changes, spec.transform_context, self.is_cancelled)

        result = status.get("result") if isinstance(status.get("result"), dict) else {}
        return JobResult(
            output=spec.output,
            model=str(result.get("model") or card.get("name") or ""),
            coarse=spec.coarse_output if keep_coarse else (spec.coarse.path if spec.coarse is not None else None),
            confidence=spec.confidence,
            changes=spec.changes,
            classes=job_classes(status, card),
            notes=[str(note) for note in result.get("notes") or []],
            device=_device(client, result),
        )

    def _client(self) -> Any:
        try:
            return self.manager.client()
        except (BackendUnavailable, RemoteUnavailable, BackendError) as exc:
            raise connection_failure(exc) from exc

    def _readable(self, spec: JobSpec, source: inputs.RasterSource, target: Path, copy_pixel: float,
                  margin: float) -> Path:
        if source.needs_copy:
            self.on_step(tr("Copying '{name}' to a GeoTIFF the backend can read…").format(name=source.name))
        return inputs.readable(source, target, spec.extent, copy_pixel, spec.transform_context, self.is_cancelled,
                               margin=margin)

    def _job(self, client: Any, fields: Dict[str, Any], low: float, high: float) -> Dict[str, Any]:
        def progress(percent: float, message: str = "") -> None:
            share = max(0.0, min(100.0, float(percent))) / 100.0
            self.on_progress(low + (high - low) * share, message)

        if getattr(client, "remote", False):
            # The same job, its files uploaded and its results downloaded to the paths in ``fields``.
            return remote.run_job(client, fields, progress, self.is_cancelled)
        job_id = client.submit(**fields)
        status = client.wait(job_id, on_progress=progress, is_cancelled=self.is_cancelled, poll=POLL_S)
        return status if isinstance(status, dict) else {}

    def _check_cancel(self) -> None:
        if self.is_cancelled():
            raise JobCancelled(tr("Cancelled: no output was written."))

    @staticmethod
    def _discard(spec: JobSpec, keep: set) -> None:
        # A backend killed while writing cannot remove its hidden temporary file (".<name>.<random>.tmp…"
        # beside the output): it goes here with the outputs this run created.
        for path in spec.outputs:
            leftovers = [path.with_name(path.name + ".aux.xml"), *path.parent.glob(f".{path.name}.*")]
            if path not in keep:
                leftovers.append(path)
            for file in leftovers:
                with contextlib.suppress(OSError):
                    file.unlink()


def _device(client: Any, result: Mapping[str, Any]) -> str:
    """The device the job ran on; on a remote backend also where ("cuda at gpu-server:8443")."""
    device = str(result.get("device") or "")
    if device and getattr(client, "remote", False):
        where = urlsplit(str(getattr(client, "base_url", ""))).netloc
        return tr("{device} at {host}").format(device=device, host=where) if where else device
    return device


def model_card(client: Any, model: Optional[str]) -> Mapping[str, Any]:
    """The card of a bundled model (by name or path) from the service, or {} for a bundle it does not list."""
    try:
        listing = client.models()
    except BackendError:
        return {}
    entries = listing.get("models", []) if isinstance(listing, dict) else list(listing or [])
    wanted = model or "dubai5"
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("card"), dict):
            continue
        if entry.get("name") == wanted or (model and _same_path(entry.get("path"), model)):
            return dict(entry["card"])
    return {}


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
