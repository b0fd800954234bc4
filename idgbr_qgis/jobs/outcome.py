"""How a job ends: its result (files, classes, notes) and its failures, as layer names and messages.

A failure carries the backend's `parameter` (a job field such as "coarse" or "bands"); each caller maps it
to its own control through a table (the toolbox to its parameter names, the dock to its widget labels), so
no message text is ever parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from ..backend_client import RemoteUnreachable, ServiceGone
from ..backend_process import BackendUnavailable, RemoteUnavailable
from ..i18n import tr


class JobError(Exception):
    """A run that failed; ``message`` says what to do. ``parameter``: the job field at fault (None: no single
    one); ``setup_needed``: the backend itself is missing or broken, so its setup is the fix."""

    def __init__(self, message: str, parameter: Optional[str] = None, setup_needed: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.parameter = parameter
        self.setup_needed = setup_needed


class JobCancelled(Exception):
    """The user cancelled the run; it left no output."""


@dataclass
class JobResult:
    """What a successful run wrote, and what the backend said about it."""

    output: Path
    model: str = ""  # the model card's name
    coarse: Optional[Path] = None  # the coarse map the refiner started from, when it is a file to show
    confidence: Optional[Path] = None
    changes: Optional[Path] = None
    classes: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    device: str = ""
    seconds: float = 0.0


def backend_failure(exc: Exception) -> JobError:
    """A JobError for a failure of the backend client (BackendError and its kinds), keeping its parameter."""
    message = str(getattr(exc, "message", "") or exc)
    if isinstance(exc, RemoteUnreachable):
        return JobError(tr("Lost contact with the remote IDGBR backend during the run: {reason}").format(
            reason=message))
    if isinstance(exc, ServiceGone):
        return JobError(tr("The IDGBR backend stopped during the run: {reason}").format(reason=message))
    parameter = getattr(exc, "parameter", None)
    return JobError(message, parameter if isinstance(parameter, str) else None)


def connection_failure(exc: Exception) -> JobError:
    """A JobError for a backend that cannot be found (BackendUnavailable) or started (BackendError), or a remote
    backend that cannot be used (RemoteUnavailable: its settings are the fix, not the setup)."""
    if isinstance(exc, RemoteUnavailable):
        return JobError(str(exc))
    if isinstance(exc, BackendUnavailable):
        text = tr("The IDGBR backend is not available: {reason}")
    else:
        text = tr("The IDGBR backend could not start: {reason}")
    return JobError(text.format(reason=exc), setup_needed=True)


def user_message(error: JobError, names: Mapping[str, str], pointer: str) -> str:
    """The error's message, followed by ``pointer`` (e.g. "(parameter {name})") naming the caller's own control
    for the job field at fault, unless the message already names it."""
    name = names.get(error.parameter or "")
    if not name or name in error.message:
        return error.message
    return f"{error.message} {pointer.format(name=name)}"


def result_name(input_name: str, what: str, model: str) -> str:
    """A result layer's name after its input and model: "dubai_sample — refined (dubai5)"."""
    return tr("{input} — {what} ({model})").format(input=input_name, what=what, model=model) if model else \
        tr("{input} — {what}").format(input=input_name, what=what)


def job_classes(status: Mapping[str, Any], card: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """The output's classes: from the job's result when it carries them, else from the model card."""
    result = status.get("result") if isinstance(status.get("result"), dict) else {}
    for holder in (result, card):
        classes = holder.get("classes") if isinstance(holder, Mapping) else None
        if isinstance(classes, list) and classes:
            return [dict(c) for c in classes if isinstance(c, dict)]
    return []
