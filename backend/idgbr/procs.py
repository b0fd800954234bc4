"""Whether another process still runs, without extra dependencies: used to recognise what dead runs left
behind (``raster.io.remove_stale_temps``) and by ``idgbr serve --parent-pid``."""

from __future__ import annotations

import os

_STILL_ACTIVE = 259  # GetExitCodeProcess's code for a running process
_ERROR_ACCESS_DENIED = 5
_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000


def pid_alive(pid: int) -> bool:
    """True while a process with this id exists (also one of another user, and a zombie not yet reaped)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists (never on Windows: it would kill it)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to someone else
    except OSError:
        return False
    return True


def _windows_pid_alive(pid: int) -> bool:
    import ctypes
    from ctypes import wintypes

    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.restype = wintypes.HANDLE
    kernel32.OpenProcess.argtypes = (wintypes.DWORD, wintypes.BOOL, wintypes.DWORD)
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return ctypes.get_last_error() == _ERROR_ACCESS_DENIED  # type: ignore[attr-defined]
    try:
        code = wintypes.DWORD()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == _STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


class ParentWatch:
    """Tells when the process ``pid`` has ended. When it is this process's parent (the usual case: the plugin
    started the service), a changed parent id says so at once on POSIX, even while the dead parent is a zombie
    that nobody reaped yet."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.direct = os.name != "nt" and os.getppid() == pid

    def gone(self) -> bool:
        if self.direct and os.getppid() != self.pid:
            return True
        return not pid_alive(self.pid)
