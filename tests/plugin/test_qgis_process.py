"""`make qgis-process`: QGIS's own command-line runner loads the plugin from a clean checkout and runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from osgeo import gdal

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL = '"320100,320164,2789836,2789900 [EPSG:32640]"'  # quoted: make passes ARGS to the shell as written

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def qgis_process(args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "QT_QPA_PLATFORM": "offscreen", **env}
    return subprocess.run(["make", "-s", "-C", str(REPO_ROOT), "qgis-process", f"ARGS={args}"], env=environment,
                          capture_output=True, text=True, timeout=600)


def json_results(completed: subprocess.CompletedProcess) -> dict:
    start = completed.stdout.find("{")
    assert start >= 0, completed.stdout + completed.stderr
    return json.loads(completed.stdout[start:])["results"]


def test_help_lists_the_parameters():
    completed = qgis_process("help idgbr:refine")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "IDGBR Refine" in completed.stdout
    for name in ("INPUT", "BANDS", "COARSE", "MODEL", "EXTENT", "STEPS", "BAND", "VOCABULARY", "MIN_CONFIDENCE",
                 "DEVICE", "OUTPUT", "CONFIDENCE", "OUTPUT_POLYGONS"):
        assert f"{name}:" in completed.stdout, name


def test_unknown_algorithm_fails():
    completed = qgis_process("help idgbr:nothing")
    assert completed.returncode != 0


@pytest.mark.timeout(600)
def test_run_uses_the_running_service_and_leaves_it_running(idgbr_backend, sample_raster, tmp_path):
    service_pid = idgbr_backend.client().pid
    out, polygons = tmp_path / "refined.tif", tmp_path / "polygons.gpkg"
    completed = qgis_process(f"--json run idgbr:refine -- INPUT={sample_raster} EXTENT={SMALL} STEPS=1 "
                             f"OUTPUT={out} OUTPUT_POLYGONS={polygons}")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json_results(completed)
    assert Path(results["OUTPUT"]) == out and out.is_file()
    assert Path(results["OUTPUT_POLYGONS"]).is_file()
    dataset = gdal.Open(str(out))
    assert (dataset.RasterXSize, dataset.RasterYSize) == (128, 128)
    assert dataset.GetGeoTransform() == pytest.approx((320100.0, 0.5, 0.0, 2789900.0, 0.0, -0.5))
    dataset = None
    # qgis_process connected to this session's service: it must not have stopped it.
    assert idgbr_backend.client().pid == service_pid


@pytest.mark.timeout(600)
def test_failure_exits_non_zero_with_the_message(idgbr_backend, sample_raster, tmp_path):
    out = tmp_path / "never.tif"
    completed = qgis_process(f"run idgbr:refine -- INPUT={sample_raster} EXTENT={SMALL} BANDS=1 BANDS=2 BANDS=9 "
                             f"OUTPUT={out}")
    assert completed.returncode != 0
    assert "Band 9 does not exist" in completed.stdout + completed.stderr
    assert not out.exists()


@pytest.mark.timeout(600)
@pytest.mark.usefixtures("bundled_model")
def test_run_stops_the_service_it_started(sample_raster, tmp_path):
    """With no service running, qgis_process starts one for the run and stops it before exiting."""
    state = tmp_path / "state"
    out = tmp_path / "refined.tif"
    completed = qgis_process(f"run idgbr:segment -- INPUT={sample_raster} EXTENT={SMALL} OUTPUT={out}",
                             IDGBR_STATE_DIR=str(state))
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert out.is_file()
    assert (state / "service.log").is_file()  # a service did run with this state folder
    assert not (state / "service.json").exists()  # and was stopped (its record removed)
    proc = Path("/proc")
    if proc.is_dir():  # Linux: no process still serves this state folder
        token = str(state / "service.token")
        for cmdline in proc.glob("[0-9]*/cmdline"):
            try:
                assert token not in cmdline.read_bytes().decode(errors="replace"), cmdline
            except OSError:
                continue
