"""The service's job queue with plain runner functions: order, one job at a time, failure, cancel, progress."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, List

import pytest

from idgbr.errors import Cancelled, IdgbrError
from idgbr.service.jobs import JobNotFound, JobQueue, QueueFull


def wait_finished(queue: JobQueue, job_id: str, timeout: float = 10.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = queue.get(job_id)
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} still {queue.get(job_id)['state']} after {timeout} s")


@pytest.fixture
def make_queue() -> Any:
    queues: List[JobQueue] = []

    def make(runner: Callable[..., Any], **kwargs: Any) -> JobQueue:
        queue = JobQueue(runner, **kwargs)
        queue.start()
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        assert queue.stop(timeout=5.0)


def test_runs_one_job_at_a_time_in_order(make_queue: Any) -> None:
    running = {"now": 0, "max": 0}
    order: List[int] = []
    lock = threading.Lock()

    def runner(options: Dict[str, Any], progress: Callable[[float, str], None], cancel: threading.Event) -> dict:
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        time.sleep(0.02)
        order.append(options["n"])
        with lock:
            running["now"] -= 1
        return {"n": options["n"]}

    queue = make_queue(runner)
    ids = [queue.submit({"n": n}, f"/out/{n}.tif").id for n in range(5)]
    results = [wait_finished(queue, job_id) for job_id in ids]
    assert [r["state"] for r in results] == ["succeeded"] * 5
    assert order == list(range(5)) and running["max"] == 1
    assert [r["result"] for r in results] == [{"n": n} for n in range(5)]
    assert all(r["progress"] == 100.0 for r in results)


def test_failures_are_reported_and_the_worker_keeps_going(make_queue: Any) -> None:
    def runner(options: Dict[str, Any], progress: Callable[[float, str], None], cancel: threading.Event) -> None:
        if options["kind"] == "user":
            raise IdgbrError("input raster is empty: pick another file")
        if options["kind"] == "bug":
            raise ZeroDivisionError("division by zero")

    queue = make_queue(runner)
    user = queue.submit({"kind": "user"}, "/o1.tif").id
    bug = queue.submit({"kind": "bug"}, "/o2.tif").id
    fine = queue.submit({"kind": "fine"}, "/o3.tif").id
    user_status = wait_finished(queue, user)
    assert user_status["state"] == "failed"
    assert user_status["message"] == "input raster is empty: pick another file"
    bug_status = wait_finished(queue, bug)
    assert bug_status["state"] == "failed" and "ZeroDivisionError" in bug_status["message"]
    assert wait_finished(queue, fine)["state"] == "succeeded"


def test_cancel_queued_and_running_jobs(make_queue: Any) -> None:
    started = threading.Event()
    calls: List[str] = []

    def runner(options: Dict[str, Any], progress: Callable[[float, str], None], cancel: threading.Event) -> None:
        calls.append(options["name"])
        started.set()
        for i in range(1000):  # a "tile" loop that checks the event like the pipeline does
            if cancel.is_set():
                raise Cancelled("cancelled")
            progress(i / 1000, f"tile {i}")
            time.sleep(0.005)

    queue = make_queue(runner)
    first = queue.submit({"name": "first"}, "/a.tif").id
    second = queue.submit({"name": "second"}, "/b.tif").id
    assert started.wait(5.0)
    assert queue.get(second)["state"] == "queued" and queue.get(second)["queue_position"] == 0
    assert queue.cancel(second)["state"] == "cancelled", "a queued job is cancelled at once"
    assert queue.cancel(first)["cancel_requested"]
    status = wait_finished(queue, first)
    assert status["state"] == "cancelled" and "no output" in status["message"]
    time.sleep(0.05)
    assert calls == ["first"], "the cancelled queued job never ran"
    assert set(queue.active_outputs()) == set()


def test_progress_is_clamped_and_never_goes_back(make_queue: Any) -> None:
    gate = threading.Event()
    seen: List[float] = []

    def runner(options: Dict[str, Any], progress: Callable[[float, str], None], cancel: threading.Event) -> None:
        progress(0.5, "half")
        progress(0.2, "late report")
        progress(7.0, "overshoot")
        progress(float("nan"), "garbage")
        gate.wait(5.0)

    queue = make_queue(runner)
    job_id = queue.submit({}, "/p.tif").id
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and queue.get(job_id)["progress"] < 100:
        seen.append(queue.get(job_id)["progress"])
        time.sleep(0.01)
    status = queue.get(job_id)
    assert status["state"] == "running" and status["progress"] == 100.0
    assert seen == sorted(seen)
    gate.set()
    assert wait_finished(queue, job_id)["state"] == "succeeded"


def test_limits_and_unknown_ids() -> None:
    queue = JobQueue(lambda *a: None, max_queued=2)  # not started: jobs stay queued
    queue.submit({}, "/1.tif")
    queue.submit({}, "/2.tif")
    with pytest.raises(QueueFull, match="cancel"):
        queue.submit({}, "/3.tif")
    with pytest.raises(JobNotFound, match="submit the job again"):
        queue.get("nope")
    with pytest.raises(JobNotFound):
        queue.cancel("nope")
    assert queue.stop(timeout=1.0)
    assert queue.counts()["cancelled"] == 2
