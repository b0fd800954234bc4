"""The tile engine's raster reads and writes on one background thread, so that reading the next tiles and
writing finished rows overlap the model.

The work runs one task at a time in the order it was submitted: no raster is ever used by two threads at
once (GDAL datasets are not thread-safe), and the rows reach the output in the same order, with the same
values, as in a run without the thread. A task's error is raised where its result is collected.
``InlineIo`` does the same work at once in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

from .io import gdal_env


class InlineIo:
    """Every task runs in the caller's thread when submitted; its error is raised there."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future

    def close(self) -> None:
        pass


class IoThread:
    """Runs submitted tasks in order on a background thread; ``close`` stops it after the task in progress
    (tasks not begun yet are cancelled: after a failure or a cancel nobody waits for them)."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="idgbr-io", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def close(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        self._tasks.put(None)
        self._thread.join()

    def _work(self) -> None:
        # GDAL settings made by rasterio.Env in another thread need not reach this one: set them here too.
        with gdal_env():
            while True:
                task = self._tasks.get()
                if task is None:
                    return
                future, fn, args = task
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, who raises it
                    future.set_exception(exc)
