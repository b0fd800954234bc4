"""User-facing errors: each message names the problem and the fix."""


class IdgbrError(Exception):
    """A problem the user can fix; the message says how."""


class Cancelled(IdgbrError):
    """The run was cancelled; nothing was written."""
