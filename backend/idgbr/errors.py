"""User-facing errors: each message names the problem and the fix; where one option is at fault, the error
also names it (``parameter``: a field of ``idgbr.pipeline.RunOptions``), so that a caller such as the QGIS
plugin can point at its own control for that option without reading the message."""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

# Machine-readable kinds of error, as the service reports them (``code``).
BAD_PARAMETER = "bad_parameter"  # one option is at fault: ``parameter`` names it
FAILED = "failed"  # the run failed for a reason no single option explains (disk full, damaged file mid-run)
CANCELLED = "cancelled"
INTERNAL = "internal_error"  # a crash: a bug to report, not something the user can fix


class IdgbrError(Exception):
    """A problem the user can fix; the message says how. ``parameter``: the RunOptions field at fault, if one is."""

    def __init__(self, message: str = "", parameter: Optional[str] = None) -> None:
        super().__init__(message)
        self.parameter = parameter

    @property
    def code(self) -> str:
        return BAD_PARAMETER if self.parameter else FAILED


class Cancelled(IdgbrError):
    """The run was cancelled; nothing was written."""

    @property
    def code(self) -> str:
        return CANCELLED


@contextlib.contextmanager
def blame(parameter: str) -> Iterator[None]:
    """Name ``parameter`` on an IdgbrError raised inside the block that does not name one yet."""
    try:
        yield
    except Cancelled:
        raise
    except IdgbrError as exc:
        if exc.parameter is None:
            exc.parameter = parameter
        raise
