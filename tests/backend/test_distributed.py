"""Runs on Dask: a run split into parts of rows on workers gives the pixels of a run in one process (every mode,
the passes at other resolutions), lost workers, an unreachable scheduler, Ctrl-C; and `idgbr batch`.

Most checks use the engine tests' stand-in model on a cluster whose workers are threads of this process (fast,
and the stand-in reaches them); the real model runs on worker processes for the end-to-end checks. Parts are
made small (``ROW_ALIGN``, ``TASK_TILE_ROWS``) so that small rasters still split into several."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

pytest.importorskip("distributed")

import distributed  # noqa: E402
from test_engine import FakeBundle  # noqa: E402 - the engine tests' stand-in model

from idgbr import distributed as dist  # noqa: E402 - after the skip when Dask is not installed
from idgbr import pipeline  # noqa: E402
from idgbr.cli import main  # noqa: E402
from idgbr.distributed import Cluster  # noqa: E402
from idgbr.errors import Cancelled, IdgbrError  # noqa: E402
from idgbr.pipeline import RunOptions, run  # noqa: E402
from idgbr.raster.windows import TileGrid  # noqa: E402

QUIET = dict(dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False})  # no fixed ports


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture
def small_parts(monkeypatch):
    """Parts of 16 rows (about one tile row), so that small rasters make many parts."""
    monkeypatch.setattr(dist, "ROW_ALIGN", 16)
    monkeypatch.setattr(dist, "TASK_TILE_ROWS", 1)


@pytest.fixture
def fake(monkeypatch):
    bundle = FakeBundle()
    monkeypatch.setattr(pipeline, "load_bundle", lambda model=None, device="auto": bundle)
    dist._MODEL_CACHE.clear()  # the workers are threads of this process: no model of another test
    yield bundle
    dist._MODEL_CACHE.clear()


@pytest.fixture(scope="module")
def thread_cluster():
    """The address of a Dask cluster of 2 workers that are threads of this process (tasks see monkeypatches)."""
    os.environ[dist.THREADS_ENV] = str(torch.get_num_threads())  # the workers leave this process's threads as is
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, **QUIET)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()
        os.environ.pop(dist.THREADS_ENV, None)


@pytest.fixture(scope="module")
def process_cluster():
    """A Dask cluster of 2 worker processes (the real model, one torch thread each)."""
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **QUIET)
    try:
        yield cluster
    finally:
        cluster.close()


def one_thread_run(options: RunOptions):
    """A run in this process with one torch thread, as each worker has (the networks' float results depend on
    the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(options)
    finally:
        torch.set_num_threads(threads)


def same_result(a, b) -> None:
    for name in ("tiles", "tiles_refined", "coarse_tiles", "class_pixels", "nodata_pixels", "changed_pixels",
                 "tile_shape", "device", "precision", "width", "height"):
        assert getattr(a, name) == getattr(b, name), name


# ------------------------------------------------------------------------------------------------------------
# Pixel identity, every mode (stand-in model)
# ------------------------------------------------------------------------------------------------------------

CASES = {
    "segment": dict(mode="segment", tile=48, overlap=12),
    "refine": dict(tile=48, overlap=12, confidence=True),
    "refine-blocks": dict(tile=48, overlap=12, block_width=256),
    "refine-coarse-map": dict(tile=32, overlap=8, coarse_map=True, band=-1),
    "segment-resampled": dict(mode="segment", tile=16, overlap=4, pixel_size=0.1),
    "refine-two-resolutions": dict(tile=16, overlap=4, pixel_size=0.1, confidence=True),
    "refine-coarse-map-resampled": dict(tile=16, overlap=4, pixel_size=0.1, coarse_map=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parts_on_workers_give_the_single_process_pixels(fake, small_parts, thread_cluster, crop_raster,
                                                         raster_writer, tmp_path, monkeypatch, case):
    settings = dict(CASES[case])
    if settings.pop("block_width", None):
        monkeypatch.setattr(pipeline, "BLOCK_WIDTH", 256)
    src = crop_raster(300, 150, col=100, row=200)
    if settings.pop("coarse_map", False):
        with rasterio.open(src) as s:
            ids = (s.read(1) // 90).astype(np.uint8)[None]  # 3 classes by brightness: many boundaries
            settings["coarse"] = raster_writer("coarse.tif", ids, crs=s.crs, transform=s.transform)
    confidence = settings.pop("confidence", False)
    results, outputs = [], []
    for name, cluster in (("one", None), ("parts", Cluster(scheduler=thread_cluster))):
        out = tmp_path / f"{name}.tif"
        conf = tmp_path / f"{name}_conf.tif" if confidence else None
        options = RunOptions(input=src, output=out, confidence=conf, **settings)
        if cluster is None:
            results.append(run(options))
        else:
            with cluster:
                results.append(run(options, cluster=cluster))
        outputs.append((out, conf))
    single, parts = results
    assert any("Ran on the Dask scheduler" in note for note in parts.notes)
    same_result(single, parts)
    np.testing.assert_array_equal(read(outputs[0][0]), read(outputs[1][0]))
    if confidence:
        np.testing.assert_array_equal(read(outputs[0][1]), read(outputs[1][1]))
    if settings.get("pixel_size"):
        assert single.coarse_pixel_m != single.input_pixel_m or single.refine_pixel_m != single.input_pixel_m
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_parts_are_written_in_order_with_progress(fake, small_parts, thread_cluster, crop_raster, tmp_path):
    messages = []
    with Cluster(scheduler=thread_cluster) as cluster:
        run(RunOptions(input=crop_raster(120, 100), output=tmp_path / "o.tif", tile=32, overlap=8),
            progress=lambda fraction, message: messages.append((fraction, message)), cluster=cluster)
    # 32 px tiles every 24 rows: parts of one tile row's step rounded up to 16 rows, 32; 100 rows make 4.
    assert [m.split(" on ")[0] for _, m in messages] == [f"parts {n}/4" for n in range(1, 5)]
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)


def test_cancel_stops_the_run_and_leaves_no_output(fake, small_parts, thread_cluster, crop_raster, tmp_path):
    import threading

    cancel = threading.Event()
    out = tmp_path / "out"
    out.mkdir()

    def progress(fraction, message):
        if fraction > 0:
            cancel.set()

    with Cluster(scheduler=thread_cluster) as cluster, pytest.raises(Cancelled):
        run(RunOptions(input=crop_raster(120, 200), output=out / "o.tif", tile=32, overlap=8), progress=progress,
            cancel=cancel, cluster=cluster)
    assert list(out.iterdir()) == []


def test_a_part_that_fails_fails_the_run_with_its_message(fake, small_parts, thread_cluster, crop_raster, tmp_path,
                                                          monkeypatch):
    real_run_part = dist.run_part

    def broken(spec, rows, block):
        if rows[0] >= 32:
            return dist.PartResult(error="INPUT is damaged or truncated: x.tif cannot be read.", parameter="input")
        return real_run_part(spec, rows, block)

    monkeypatch.setattr(dist, "run_part", broken)
    out = tmp_path / "out"
    out.mkdir()
    with Cluster(scheduler=thread_cluster) as cluster, pytest.raises(IdgbrError, match="damaged") as error:
        run(RunOptions(input=crop_raster(120, 100), output=out / "o.tif", tile=32, overlap=8), cluster=cluster)
    assert error.value.parameter == "input"
    assert list(out.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# The real model on worker processes
# ------------------------------------------------------------------------------------------------------------

def test_workers_give_the_single_process_pixels_and_rerun_a_lost_workers_part(bundled_model, small_parts,
                                                                              crop_raster, tmp_path, monkeypatch,
                                                                              capsys):
    """`--workers 2`: a local cluster of two processes; the first part kills its worker, Dask runs it again."""
    src = crop_raster(128, 160, col=420, row=300)
    common = ["--steps", "1", "--tile", "64", "--overlap", "16", "--threads", "1", "-q"]
    killed = tmp_path / "killed"
    monkeypatch.setenv(dist.KILL_ENV, f"once:{killed}")
    out = tmp_path / "parts.tif"
    assert main(["refine", str(src), "-o", str(out), "--workers", "2", *common]) == 0, capsys.readouterr().err
    assert killed.exists()  # a worker did die
    one = tmp_path / "one.tif"
    one_thread_run(RunOptions(input=src, output=one, steps=1, tile=64, overlap=16))
    np.testing.assert_array_equal(read(one), read(out))
    assert len(np.unique(read(out))) > 1


def test_two_resolutions_on_worker_processes_give_the_single_process_pixels(bundled_model, small_parts,
                                                                            process_cluster, sample_raster,
                                                                            tmp_path):
    """--pixel-size 0.05 on the sample: segmented at 0.5 m and refined at 0.25 m on their own grids, through a
    temporary coarse map the workers read, written back on the 5 cm grid."""
    settings = dict(steps=1, tile=64, overlap=16, pixel_size=0.05)
    with Cluster(scheduler=process_cluster.scheduler_address, threads=1) as cluster:
        parts = run(RunOptions(input=sample_raster, output=tmp_path / "parts.tif", **settings), cluster=cluster)
    single = one_thread_run(RunOptions(input=sample_raster, output=tmp_path / "one.tif", **settings))
    assert (single.coarse_pixel_m, single.refine_pixel_m) == (0.5, 0.25)
    same_result(single, parts)
    np.testing.assert_array_equal(read(tmp_path / "one.tif"), read(tmp_path / "parts.tif"))


@pytest.mark.parametrize("slots", [1, 2, 3, 4])
def test_parts_share_the_rows_out_evenly_among_the_workers(slots):
    """A 4096-row raster of 512 px tiles (9 tile rows) once made parts of 3584 and 512 rows, so a second
    worker sat idle for most of the run; now the parts come in a multiple of the workers, of nearly equal
    height, and none is longer than about TASK_TILE_ROWS tile rows."""
    grid = TileGrid(4096, 4096, 512, 64)
    rows = dist.part_rows(grid, slots)
    heights = [bottom - top for top, bottom in rows]
    assert rows[0][0] == 0 and rows[-1][1] == 4096 and all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
    assert all(top % dist.ROW_ALIGN == 0 for top, _ in rows)
    assert len(heights) % slots == 0
    assert max(heights) - min(heights) <= dist.ROW_ALIGN
    assert max(heights) <= dist.TASK_TILE_ROWS * (512 - 64)


def test_local_workers_keep_the_allocators_adaptive_threshold(monkeypatch):
    """Dask's nannies set MALLOC_TRIM_THRESHOLD_ in the workers they start, which made the networks 2.5 times
    slower there than in one process; the local cluster of --workers N starts its workers without it, also
    after another cluster's nannies in this process left Dask's value in its environment."""
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with Cluster(workers=1, threads=1) as cluster:
        seen = cluster.client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(seen.values()) == [None]


def test_workers_started_with_a_trim_threshold_are_named_in_the_note(bundled_model, process_cluster,
                                                                     sample_raster, tmp_path):
    """Workers started elsewhere with Dask's defaults: the run works and its note says how to start them."""
    with Cluster(scheduler=process_cluster.scheduler_address, threads=1) as cluster:
        cluster.prepare(RunOptions(input=sample_raster, output=tmp_path / "o.tif"), [sample_raster],
                        [tmp_path / "o.tif"])
    assert "MALLOC_TRIM_THRESHOLD_" in cluster.note
    assert "PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None" in cluster.note


def test_a_part_that_keeps_killing_workers_fails_clearly_without_output(bundled_model, small_parts,
                                                                        process_cluster, crop_raster, tmp_path):
    scheduler = process_cluster.scheduler
    allowed = scheduler.allowed_failures
    client = distributed.Client(process_cluster, set_as_default=False)
    out = tmp_path / "out"
    out.mkdir()
    key = dist.KILL_ENV
    try:
        scheduler.allowed_failures = 0  # the first lost worker settles it
        client.run(lambda: os.environ.__setitem__(key, "always"))  # a lambda travels by value
        fails = pytest.raises(IdgbrError, match="workers died again and again running rows 0-")
        with Cluster(scheduler=process_cluster.scheduler_address) as cluster, fails:
            run(RunOptions(input=crop_raster(64, 64), output=out / "o.tif", steps=1, tile=64, overlap=16),
                cluster=cluster)
    finally:
        scheduler.allowed_failures = allowed
        client.run(lambda: os.environ.pop(key, None))
        client.close()
    assert list(out.iterdir()) == []


def test_ctrl_c_stops_the_local_cluster_and_leaves_no_output(bundled_model, crop_raster, tmp_path):
    psutil = pytest.importorskip("psutil")
    src = crop_raster(96, 96, col=400, row=300)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hold = tmp_path / "held"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "IDGBR_TEST_HOLD": str(hold)}
    proc = subprocess.Popen([sys.executable, "-m", "idgbr", "refine", str(src), "-o", str(out_dir / "out.tif"),
                             "--workers", "2", "-q"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300  # only against a hang: the run waits at the hold for the signal
        while not hold.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hold.exists() and proc.poll() is None, "the run did not reach the hold point"
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert len(workers) >= 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted; no output was written" in err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == []
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# Bad cluster settings
# ------------------------------------------------------------------------------------------------------------

def test_unreachable_scheduler_is_named_in_one_line(crop_raster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dist, "CONNECT_TIMEOUT_S", 1.0)
    out = tmp_path / "o.tif"
    assert main(["segment", str(crop_raster(32, 32)), "-o", str(out), "--scheduler", "tcp://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert "Could not reach the Dask scheduler at tcp://127.0.0.1:9" in err and "dask scheduler" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be a whole number from 1"),
    (["--threads", "2"], "--threads applies to Dask workers"),
    (["--workers", "2", "--backend", "https://x:1", "--token-file", "t"], "choose one"),
])
def test_bad_cluster_options_fail_before_any_work(crop_raster, tmp_path, capsys, args, message):
    assert main(["segment", str(crop_raster(32, 32)), "-o", str(tmp_path / "o.tif"), *args]) == 1
    assert message in capsys.readouterr().err


def test_workers_that_cannot_see_the_input_are_named(fake, thread_cluster, crop_raster, tmp_path, monkeypatch):
    real_probe = dist.probe_worker
    monkeypatch.setattr(dist, "probe_worker", lambda request: {**real_probe(request), "missing": request["paths"]})
    fails = pytest.raises(IdgbrError, match="cannot see .*same paths as this computer")
    with Cluster(scheduler=thread_cluster) as cluster, fails:
        run(RunOptions(input=crop_raster(32, 32), output=tmp_path / "o.tif"), cluster=cluster)
    assert not (tmp_path / "o.tif").exists()


# ------------------------------------------------------------------------------------------------------------
# idgbr batch
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def rasters(crop_raster, tmp_path) -> Path:
    """A folder of three good rasters and one that is not a raster."""
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(3):
        crop_raster(64, 48, col=100 * n, row=200, name=f"in/r{n}.tif")
    (folder / "broken.tif").write_text("not a raster")
    return folder


def summary(folder: Path) -> dict:
    return {Path(r["input"]).name: r for r in json.loads((folder / "batch_summary.json").read_text())["rasters"]}


def test_batch_runs_each_raster_and_reports_the_bad_one(fake, rasters, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["batch", str(rasters), "--output-dir", str(out), "--tile", "32", "--overlap", "8"]) == 1
    table = capsys.readouterr().out
    rows = summary(out)
    assert {name: r["status"] for name, r in rows.items()} == {
        "broken.tif": "failed", "r0.tif": "done", "r1.tif": "done", "r2.tif": "done"}
    assert "not a raster GDAL can read" in rows["broken.tif"]["error"]
    assert rows["r0.tif"]["width"] == 64 and rows["r0.tif"]["height"] == 48 and rows["r0.tif"]["seconds"] > 0
    assert sum(rows["r0.tif"]["classes"].values()) == 64 * 48
    assert sorted(p.name for p in out.iterdir()) == [
        "batch_summary.json", "batch_summary.txt", "r0_refined.tif", "r0_refined.tif.aux.xml", "r1_refined.tif",
        "r1_refined.tif.aux.xml", "r2_refined.tif", "r2_refined.tif.aux.xml"]
    text = (out / "batch_summary.txt").read_text()
    assert text.splitlines()[0].split() == ["raster", "size", "seconds", "classes", "status", "error"]
    assert "64 x 48" in text and "3 done, 0 skipped, 1 failed, 0 cancelled." in text and text in table


def test_batch_skips_existing_outputs_unless_overwrite(fake, rasters, tmp_path):
    out = tmp_path / "out"
    good = [str(rasters / f"r{n}.tif") for n in range(3)]
    assert main(["batch", good[0], "--output-dir", str(out), "--mode", "segment", "-q"]) == 0
    first = (out / "r0_segmented.tif").stat().st_mtime_ns
    assert main(["batch", *good, "--output-dir", str(out), "--mode", "segment", "-q"]) == 0
    assert {n: r["status"] for n, r in summary(out).items()} == {"r0.tif": "skipped", "r1.tif": "done",
                                                                 "r2.tif": "done"}
    assert (out / "r0_segmented.tif").stat().st_mtime_ns == first
    assert main(["batch", *good, "--output-dir", str(out), "--mode", "segment", "--overwrite", "-q"]) == 0
    assert {r["status"] for r in summary(out).values()} == {"done"}
    assert (out / "r0_segmented.tif").stat().st_mtime_ns != first


def test_batch_spreads_rasters_over_a_cluster(fake, rasters, thread_cluster, tmp_path):
    out = tmp_path / "out"
    assert main(["batch", str(rasters), "--output-dir", str(out), "--scheduler", thread_cluster, "--tile", "32",
                 "--overlap", "8", "-q"]) == 1
    rows = summary(out)
    assert [rows[n]["status"] for n in sorted(rows)] == ["failed", "done", "done", "done"]
    # The same pixels as one after another here.
    here = tmp_path / "here"
    main(["batch", str(rasters / "r1.tif"), "--output-dir", str(here), "--tile", "32", "--overlap", "8", "-q"])
    np.testing.assert_array_equal(read(out / "r1_refined.tif"), read(here / "r1_refined.tif"))


def test_batch_refuses_two_inputs_with_one_output_name(fake, crop_raster, tmp_path, capsys):
    a = crop_raster(32, 32, name="a.tif")
    (tmp_path / "sub").mkdir()
    b = crop_raster(32, 32, name="sub/a.tif")
    assert main(["batch", str(a), str(b), "--output-dir", str(tmp_path / "out")]) == 1
    assert "would both be written to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_task_the_scheduler_cancelled_is_reported_as_a_lost_scheduler():
    """Some Dask versions answer a task the scheduler dropped with an unrelated error from their own polling
    (UnboundLocalError); the user must read that the scheduler was lost, not that a worker failed."""
    class DroppedTask:
        status = "cancelled"

        def result(self, timeout=None):
            raise UnboundLocalError("cannot access local variable 'result'")

    cluster = Cluster(scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(IdgbrError, match="Lost .*scheduler cancelled the task.*nothing was written"):
        cluster.wait(DroppedTask(), None, "rows 0-63")
