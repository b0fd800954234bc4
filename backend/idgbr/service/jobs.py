"""Job queue of the service: one worker thread runs one job at a time; the rest wait in order."""

from __future__ import annotations

import dataclasses
import enum
import math
import queue
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from idgbr.errors import CANCELLED, INTERNAL, Cancelled, IdgbrError

# runner(options, progress, cancel) -> result; progress(fraction 0..1, message). Matches idgbr.pipeline.run.
Runner = Callable[[Any, Callable[[float, str], None], threading.Event], Any]


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class QueueFull(IdgbrError):
    """Too many jobs are waiting."""


class JobNotFound(IdgbrError):
    """No job has this id (never submitted, or forgotten after the service restarted)."""


@dataclasses.dataclass
class Job:
    id: str
    options: Any
    output: str
    also_writes: Tuple[str, ...] = ()  # further outputs (the confidence raster)
    state: JobState = JobState.QUEUED
    progress: float = 0.0  # percent, 0..100
    message: str = "queued"
    created: float = dataclasses.field(default_factory=time.time)
    started: Optional[float] = None
    finished: Optional[float] = None
    cancel_requested: bool = False
    result: Optional[Dict[str, Any]] = None
    # Why a failed or cancelled job ended: {"code", "parameter", "message"} (codes: idgbr.errors).
    error: Optional[Dict[str, Any]] = None
    cancel_event: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)

    def snapshot(self, position: Optional[int] = None) -> Dict[str, Any]:
        """A JSON-ready view of the job; POSITION is its place in the queue (0 = next)."""
        end = self.finished if self.finished is not None else time.time()
        return {
            "id": self.id,
            "state": self.state.value,
            "progress": round(self.progress, 2),
            "message": self.message,
            "output": self.output,
            "cancel_requested": self.cancel_requested,
            "queue_position": position,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "elapsed_s": round(end - self.started, 3) if self.started is not None else None,
            "result": self.result,
            "error": self.error,
        }


def _jsonable(value: Any) -> Any:
    """RunResult (or anything) as plain JSON values; unknown objects become strings."""
    if callable(getattr(value, "to_dict", None)):
        value = value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, Path):
        return str(value)
    return str(value)


class JobQueue:
    """FIFO of jobs with a single worker thread (one model on one device at a time)."""

    def __init__(self, runner: Runner, *, max_queued: int = 64, keep_finished: int = 200) -> None:
        self._runner = runner
        self._max_queued = max_queued
        self._keep_finished = keep_finished
        self._jobs: Dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pending: queue.Queue[Optional[str]] = queue.Queue()
        self._order: List[str] = []  # ids of queued jobs in run order, for queue_position
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            # Daemon: a stuck native call must not keep the process alive after shutdown gave up waiting.
            self._thread = threading.Thread(target=self._work, name="idgbr-job-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """Cancel everything and wait up to TIMEOUT s for the running job to clean up. True if it stopped."""
        with self._lock:
            for job in self._jobs.values():
                if not job.state.finished:
                    self._request_cancel(job)
        self._pending.put(None)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- API -----------------------------------------------------------------------------------------------------
    def submit(self, options: Any, output: str, also_writes: Sequence[str] = (), job_id: Optional[str] = None) -> Job:
        """Queue a job; JOB_ID (default: a new random one) lets the caller name files after the job first."""
        with self._lock:
            if len(self._order) >= self._max_queued:
                raise QueueFull(
                    f"{len(self._order)} jobs are already waiting: wait for some to finish or cancel them"
                )
            job = Job(id=job_id or uuid.uuid4().hex, options=options, output=output, also_writes=tuple(also_writes))
            self._jobs[job.id] = job
            self._order.append(job.id)
            self._forget_old()
        self._pending.put(job.id)
        return job

    def get(self, job_id: str) -> Dict[str, Any]:
        with self._lock:
            return self._snapshot(self._find(job_id))

    def list(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [self._snapshot(job) for job in self._jobs.values()]

    def cancel(self, job_id: str) -> Dict[str, Any]:
        """Cancel a queued job at once, or ask the running one to stop (takes effect at its next check)."""
        with self._lock:
            job = self._find(job_id)
            if not job.state.finished:
                self._request_cancel(job)
            return self._snapshot(job)

    def active_outputs(self) -> List[str]:
        """Outputs of queued and running jobs (two jobs must not write the same file)."""
        with self._lock:
            return [path for job in self._jobs.values() if not job.state.finished
                    for path in (job.output, *job.also_writes)]

    def counts(self) -> Dict[str, int]:
        with self._lock:
            counts = {state.value: 0 for state in JobState}
            for job in self._jobs.values():
                counts[job.state.value] += 1
            return counts

    # -- internals (call with the lock held) -------------------------------------------------------------------
    def _find(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} in this service (it may have restarted): submit the job again")
        return job

    def _snapshot(self, job: Job) -> Dict[str, Any]:
        position = self._order.index(job.id) if job.state is JobState.QUEUED and job.id in self._order else None
        return job.snapshot(position)

    def _request_cancel(self, job: Job) -> None:
        job.cancel_requested = True
        job.cancel_event.set()
        if job.state is JobState.QUEUED:
            self._finish(job, JobState.CANCELLED, "cancelled before it started", CANCELLED)
        else:
            job.message = "cancelling…"

    def _finish(self, job: Job, state: JobState, message: str, code: Optional[str] = None,
                parameter: Optional[str] = None) -> None:
        job.state = state
        job.message = message
        job.finished = time.time()
        if code is not None:
            job.error = {"code": code, "parameter": parameter, "message": message}
        if job.id in self._order:
            self._order.remove(job.id)

    def _forget_old(self) -> None:
        finished = [job for job in self._jobs.values() if job.state.finished]
        for job in finished[: max(0, len(finished) - self._keep_finished)]:
            del self._jobs[job.id]

    # -- worker ------------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job_id = self._pending.get()
            if job_id is None:
                return
            with self._lock:
                job = self._jobs.get(job_id)
                if job is None or job.state is not JobState.QUEUED:
                    continue  # cancelled while waiting
                self._order.remove(job.id)
                job.state = JobState.RUNNING
                job.started = time.time()
                job.message = "starting"
            self._run(job)

    def _run(self, job: Job) -> None:
        def progress(fraction: float, message: str = "") -> None:
            try:
                pct = float(fraction) * 100.0
            except (TypeError, ValueError):
                return
            if not math.isfinite(pct):
                return
            pct = min(100.0, max(0.0, pct))
            with self._lock:
                if job.state is JobState.RUNNING:
                    job.progress = max(job.progress, pct)  # never goes backwards for the user
                    if not job.cancel_requested:
                        job.message = str(message) or job.message

        try:
            result = self._runner(job.options, progress, job.cancel_event)
        except Cancelled:
            with self._lock:
                self._finish(job, JobState.CANCELLED, "cancelled; no output was written", CANCELLED)
        except IdgbrError as exc:
            with self._lock:
                self._finish(job, JobState.FAILED, str(exc) or type(exc).__name__, exc.code, exc.parameter)
        except BaseException as exc:  # noqa: BLE001 - any crash fails this job only; the service keeps serving
            traceback.print_exc(file=sys.stderr)
            with self._lock:
                self._finish(
                    job, JobState.FAILED,
                    f"internal error {type(exc).__name__}: {exc} — please report it with the service log", INTERNAL,
                )
            if not isinstance(exc, Exception):
                raise
        else:
            with self._lock:
                # A cancel that arrived after the last check is too late: the output exists, report success.
                job.result = _jsonable(result)
                job.progress = 100.0
                self._finish(job, JobState.SUCCEEDED, "done")
