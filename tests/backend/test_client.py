"""The plugin's stdlib client against a real `python -m idgbr serve` on loopback: start, reuse, jobs end to end,
cancel, a killed service, concurrent submissions, and the errors a user sees for a broken interpreter."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import venv
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List

import numpy as np
import pytest
import rasterio

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_FILE = REPO_ROOT / "idgbr_qgis" / "backend_client.py"
PYTHON = sys.executable
# The sample raster is 1000 x 1000 px at 0.5 m with its top-left corner at (320000, 2790000), EPSG:32640.
LEFT, TOP, PIXEL = 320000.0, 2790000.0, 0.5

pytestmark = pytest.mark.timeout(300)


def load_client_module() -> ModuleType:
    """Load the client from its file, as QGIS would, without importing the plugin package around it."""
    spec = importlib.util.spec_from_file_location("idgbr_backend_client_under_test", CLIENT_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bc = load_client_module()


def extent(px: int, col: int = 0, row: int = 0) -> List[float]:
    """A square of PX pixels whose top-left pixel is (ROW, COL) of the sample raster."""
    xmin, ymax = LEFT + col * PIXEL, TOP - row * PIXEL
    return [xmin, ymax - px * PIXEL, xmin + px * PIXEL, ymax]


def stop(client: Any) -> None:
    try:
        client.shutdown(timeout=30)
    finally:
        if client.process is not None and client.process.poll() is None:
            client.process.kill()
            client.process.wait(timeout=10)


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("idgbr-state")


@pytest.fixture(scope="module")
def client(state_dir: Path) -> Iterator[Any]:
    started = bc.BackendClient.start_or_connect(PYTHON, state_dir=state_dir, timeout=120)
    yield started
    stop(started)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory, sample_raster: Path) -> Path:
    """A copy of the sample raster, so side files GDAL may write beside an input stay out of the repository."""
    copy = tmp_path_factory.mktemp("sample") / sample_raster.name
    shutil.copyfile(sample_raster, copy)
    return copy


def wait_for_state(client: Any, job_id: str, states: tuple, timeout: float = 120.0) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.status(job_id)
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {states}: {client.status(job_id)}")


def outputs(folder: Path) -> List[str]:
    """Files in FOLDER, leaving out GDAL's .aux.xml sidecars (class names live there) of outputs present."""
    names = {p.name for p in folder.iterdir()}
    return sorted(n for n in names if not (n.endswith(".aux.xml") and n[: -len(".aux.xml")] in names))


# ----------------------------------------------------------------------------------------------------------------
# The client itself
# ----------------------------------------------------------------------------------------------------------------
def test_client_needs_only_the_standard_library_of_python_3_9() -> None:
    # -I -S: no site-packages at all, so any third-party (or QGIS) import would fail here.
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('c', {str(CLIENT_FILE)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.BackendClient.__name__)")
    done = subprocess.run([PYTHON, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "BackendClient", done.stderr
    # QGIS 3.22 on Windows ships Python 3.9.
    ast.parse(CLIENT_FILE.read_text(encoding="utf-8"), feature_version=(3, 9))


def test_start_records_state_and_a_second_call_reuses_it(client: Any, state_dir: Path) -> None:
    record = json.loads((state_dir / "service.json").read_text())
    assert record["port"] == client.port and record["pid"] == client.pid
    token_file = Path(record["token_file"])
    if os.name != "nt":
        assert token_file.stat().st_mode & 0o777 == 0o600
    again = bc.BackendClient.start_or_connect(PYTHON, state_dir=state_dir, timeout=120)
    assert again.port == client.port and again.process is None and again.pid == client.pid
    assert again.health()["pid"] == client.pid


def test_health_and_models(client: Any) -> None:
    health = client.health()
    assert health["service"] == "idgbr" and health["torch"] and health["device"] in ("cpu", "cuda", "mps")
    if health["device"] == "cpu":
        assert health["device_reason"]
    names = {entry["name"] for entry in client.models()}
    from idgbr.model_bundle import bundled_models

    assert names == set(bundled_models())


def test_missing_interpreter_is_named(tmp_path: Path) -> None:
    with pytest.raises(bc.BackendError, match="Python interpreter not found: .*plugin's settings"):
        bc.BackendClient.start_or_connect(tmp_path / "no" / "python", state_dir=tmp_path)


def _bare_venv(folder: Path) -> Path:
    venv.create(folder, with_pip=False, system_site_packages=False)
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    assert python.exists()
    return python


def test_interpreter_without_the_backend(tmp_path: Path) -> None:
    python = _bare_venv(tmp_path / "venv")
    with pytest.raises(bc.BackendError) as info:
        bc.BackendClient.start_or_connect(python, state_dir=tmp_path / "state", timeout=60)
    message = str(info.value)
    assert "has no IDGBR backend installed" in message and "plugin's settings" in message
    # GIS users are pointed at the setup button, never at a developer command.
    assert "Set up backend" in message and "make install" not in message
    assert not (tmp_path / "state" / "service.json").exists()


def test_interpreter_without_torch(tmp_path: Path) -> None:
    python = _bare_venv(tmp_path / "venv")
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The backend's source is importable, its dependencies (numpy, torch, ...) are not.
    Path(site, "idgbr-source.pth").write_text(str(REPO_ROOT / "backend") + "\n")
    with pytest.raises(bc.BackendError) as info:
        bc.BackendClient.start_or_connect(python, state_dir=tmp_path / "state", timeout=60)
    message = str(info.value)
    assert "cannot import" in message and "which the backend needs" in message and "plugin's settings" in message


def test_taken_port_is_reported(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        port = blocker.getsockname()[1]
        with pytest.raises(bc.BackendError, match=f"port {port} on 127.0.0.1 is taken"):
            bc.BackendClient.start_or_connect(PYTHON, state_dir=tmp_path, timeout=60, port=port)


# ----------------------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------------------
def test_job_end_to_end(client: Any, state_dir: Path, bundled_model: Path, sample: Path,
                        tmp_path: Path) -> None:
    output = tmp_path / "refined.tif"
    job_id = client.submit(input=sample, output=output, extent=extent(256, col=300, row=300),
                           extent_crs="EPSG:32640", steps=2)
    # The job belongs to the service, not to this client object: another client can follow it.
    other = bc.BackendClient.start_or_connect(PYTHON, state_dir=state_dir)
    seen: List[float] = []
    status = other.wait(job_id, on_progress=lambda pct, msg: seen.append(pct), poll=0.1)
    assert status["state"] == "succeeded" and status["progress"] == 100.0
    assert seen == sorted(seen) and seen[-1] == 100.0
    assert Path(status["output"]) == output
    assert status["result"]["width"] == 256 and status["result"]["height"] == 256

    with rasterio.open(output) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (256, 256, 1, "uint8")
        assert ds.crs.to_epsg() == 32640
        assert (ds.transform.c, ds.transform.f) == (LEFT + 300 * PIXEL, TOP - 300 * PIXEL)
        ids = np.unique(ds.read(1))
    classes = {c["id"] for c in status["result"]["classes"]}
    assert set(ids.tolist()) <= classes | {255}
    assert outputs(tmp_path) == ["refined.tif"], "no temporary files left"

    loaded = client.health()["models_loaded"]
    assert [m["name"] for m in loaded] == ["dubai5"], "the model stays loaded for the next job"


def test_job_with_rules_and_confidence_output(client: Any, bundled_model: Path, sample: Path,
                                             tmp_path: Path) -> None:
    output, confidence = tmp_path / "refined.tif", tmp_path / "confidence.tif"
    job_id = client.submit(input=sample, output=output, confidence=confidence, extent=extent(96, col=300, row=300),
                           steps=1, band=6, vocabulary=-1, min_confidence=0.4)
    status = client.wait(job_id, poll=0.1)
    result = status["result"]
    assert (result["band"], result["vocabulary"], result["min_confidence"]) == (6, -1, 0.4)
    assert Path(result["confidence"]) == confidence
    with rasterio.open(output) as ids, rasterio.open(confidence) as conf:
        assert (conf.crs, conf.transform, conf.shape) == (ids.crs, ids.transform, ids.shape)
        assert conf.dtypes[0] == "float32"
        values = conf.read(1)[ids.read(1) != 255]
    assert values.size and ((values >= 0) & (values <= 1)).all()
    assert outputs(tmp_path) == ["confidence.tif", "refined.tif"], "no temporary files left"

    segment = tmp_path / "segment"
    segment.mkdir()
    with pytest.raises(bc.BackendError, match="confidence is only written in refine mode") as refused:
        client.submit(input=sample, output=segment / "o.tif", mode="segment", confidence=segment / "c.tif")
    assert refused.value.status == 422 and list(segment.iterdir()) == []


def test_failing_job_reports_its_message_and_the_service_keeps_serving(client: Any, bundled_model: Path,
                                                                        sample: Path, tmp_path: Path) -> None:
    job_id = client.submit(input=str(sample), output=str(tmp_path / "out.tif"), bands=[4, 5, 6])
    with pytest.raises(bc.JobFailed) as info:
        client.wait(job_id, poll=0.1)
    assert "band" in str(info.value).lower()
    assert (info.value.code, info.value.parameter) == ("bad_parameter", "bands")
    assert client.status(job_id)["state"] == "failed"
    assert list(tmp_path.iterdir()) == []
    assert client.health()["service"] == "idgbr"


def test_refused_request_names_the_field_at_fault(client: Any, sample: Path, tmp_path: Path) -> None:
    """A refusal carries a code and the field, and the service's own message without the request around it."""
    missing = tmp_path / "no_coarse.tif"
    with pytest.raises(bc.BackendError) as info:
        client.submit(input=sample, output=tmp_path / "o.tif", coarse=missing)
    refused = info.value
    assert (refused.status, refused.code, refused.parameter) == (400, "bad_parameter", "coarse")
    assert refused.message == f"coarse raster {missing} does not exist: check the path"
    with pytest.raises(bc.BackendError) as info:
        client.submit(input=sample, output=tmp_path / "o.tif", steps=500)
    assert (info.value.status, info.value.code, info.value.parameter) == (422, "bad_parameter", "steps")
    with pytest.raises(bc.BackendError) as info:
        client.submit(input=sample, output=tmp_path / "o.tif", precision="fp8")
    assert (info.value.status, info.value.code, info.value.parameter) == (422, "bad_parameter", "precision")


def test_precision_a_device_cannot_run_fails_the_job_naming_precision(client: Any, bundled_model: Path,
                                                                      sample: Path, tmp_path: Path) -> None:
    job_id = client.submit(input=str(sample), output=str(tmp_path / "out.tif"), device="cpu", precision="fp16")
    with pytest.raises(bc.JobFailed, match="fp16 runs only on a CUDA GPU") as info:
        client.wait(job_id, poll=0.1)
    assert (info.value.code, info.value.parameter) == ("bad_parameter", "precision")
    assert list(tmp_path.iterdir()) == []


def test_cancel_mid_job_leaves_no_output(client: Any, bundled_model: Path, sample: Path,
                                         tmp_path: Path) -> None:
    output = tmp_path / "cancelled.tif"
    # Many small tiles: the job runs long enough to be cancelled in the middle.
    job_id = client.submit(input=sample, output=output, extent=extent(512), tile=128, overlap=16)
    queued_id = client.submit(input=sample, output=tmp_path / "queued.tif", extent=extent(128))
    with pytest.raises(bc.BackendError) as conflict:
        client.submit(input=sample, output=output, extent=extent(128))
    assert conflict.value.status == 409 and "already writes" in str(conflict.value)

    assert client.cancel(queued_id)["state"] == "cancelled", "a queued job is cancelled at once"

    progress: List[float] = []
    asked: Dict[str, float] = {}

    def is_cancelled() -> bool:
        if progress and progress[-1] > 0 and "at" not in asked:
            asked["at"] = time.monotonic()
        return "at" in asked

    with pytest.raises(bc.JobCancelled, match="no output"):
        client.wait(job_id, on_progress=lambda pct, msg: progress.append(pct), is_cancelled=is_cancelled, poll=0.05)
    latency = time.monotonic() - asked["at"]
    print(f"cancel took effect {latency:.2f} s after the request (progress {progress[-1]:.0f} %)")
    assert 0 < progress[-1] < 100
    assert list(tmp_path.iterdir()) == [], "cancel leaves neither the output nor a temporary file"
    assert client.cancel(job_id)["state"] == "cancelled", "cancelling again is harmless"


def test_concurrent_submissions_all_complete(client: Any, bundled_model: Path, sample: Path,
                                             tmp_path: Path) -> None:
    results: Dict[int, Any] = {}

    def one(n: int) -> None:
        try:
            job_id = client.submit(input=sample, output=tmp_path / f"out{n}.tif", mode="segment",
                                   extent=extent(128, col=128 * n, row=128 * n))
            results[n] = client.wait(job_id, poll=0.1)
        except Exception as exc:  # reported below with the others
            results[n] = exc

    threads = [threading.Thread(target=one, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert all(isinstance(r, dict) and r["state"] == "succeeded" for r in results.values()), results
    assert len(results) == 4
    assert outputs(tmp_path) == [f"out{n}.tif" for n in range(4)]
    # One at a time: no two jobs ran at once.
    spans = sorted((r["started"], r["finished"]) for r in results.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_killed_service_is_reported_and_the_next_start_is_fresh(bundled_model: Path, sample: Path,
                                                                tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = bc.BackendClient.start_or_connect(PYTHON, state_dir=state, timeout=120)
    try:
        job_id = first.submit(input=sample, output=tmp_path / "out.tif", extent=extent(512), tile=128,
                              overlap=16)
        wait_for_state(first, job_id, ("running",))
        first.process.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
        with pytest.raises(bc.ServiceGone) as info:
            first.wait(job_id, poll=0.05)
        message = str(info.value)
        assert "the backend service stopped" in message and "fresh service" in message
        if os.name != "nt":
            assert "killed by signal 9" in message
        assert not (tmp_path / "out.tif").exists()

        second = bc.BackendClient.start_or_connect(PYTHON, state_dir=state, timeout=120)
        try:
            assert second.process is not None and second.pid != first.pid
            assert second.health()["pid"] == second.pid
            assert json.loads((state / "service.json").read_text())["pid"] == second.pid
            # Shutting down in the middle of a job cancels it cleanly: nothing is left in its output folder.
            out_dir = tmp_path / "shutdown"
            out_dir.mkdir()
            job_id = second.submit(input=sample, output=out_dir / "out.tif", extent=extent(512), tile=128,
                                   overlap=16)
            wait_for_state(second, job_id, ("running",))
        finally:
            stop(second)
        assert second.process.returncode == 0
        assert list(out_dir.iterdir()) == []
        assert not (state / "service.json").exists(), "shutdown forgets the service"
    finally:
        if first.process.poll() is None:
            first.process.kill()
