"""Writing the outputs when the disk says no: every write checked, the result verified before it is put in place,
the previous output (and its .aux.xml) untouched on any failure, a full disk named as such, and the temporary
files of interrupted runs removed by the next run in the folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import RasterioIOError

from idgbr.cli import main
from idgbr.raster import io as raster_io

REPO_ROOT = Path(__file__).resolve().parents[2]
OLD = {"o.tif": b"old output", "o.tif.aux.xml": b"<PAMDataset/>", "c.tif": b"old confidence"}


@pytest.fixture(autouse=True)
def _model(bundled_model):
    return bundled_model


def _old_outputs(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    for name, data in OLD.items():
        (folder / name).write_bytes(data)


def _assert_old_outputs_untouched(folder: Path) -> None:
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == OLD, "old outputs changed or temporary files left"


def _fails_with(args: list[str], capsys) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "idgbr: error:" in err and "Traceback" not in err
    return err


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_fails_at_the_end_is_caught_and_the_old_outputs_stay(crop_raster, tmp_path):
    """The issue's `(ulimit -f 30; idgbr refine ...)`: GDAL's last flush fails, reported only on its error
    stream. The class output fits under the limit, the confidence does not: neither is replaced."""
    src = crop_raster(128, 128, col=400, row=300)
    out_dir = tmp_path / "out"
    _old_outputs(out_dir)

    def limit_file_size() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, resource.RLIM_INFINITY))

    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "idgbr", "refine", str(src), "-o", str(out_dir / "o.tif"),
                           "--confidence", str(out_dir / "c.tif"), "--steps", "1", "-q"],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Wrote" not in proc.stdout
    assert f"idgbr: error: Could not write the confidence output (--confidence) {out_dir / 'c.tif'}" in proc.stderr
    assert "the file written is incomplete when read back" in proc.stderr and "nothing was written" in proc.stderr
    _assert_old_outputs_untouched(out_dir)


def test_a_full_disk_is_named_with_the_space_needed(crop_raster, tmp_path, capsys, monkeypatch):
    """ENOSPC simulated deterministically: GDAL's write fails and the device reports no free space."""
    src = crop_raster(64, 64)
    out_dir = tmp_path / "out"
    _old_outputs(out_dir)

    def disk_full(self, *args, **kwargs):
        raise RasterioIOError("Write failed. See previous exception for details.")

    monkeypatch.setattr(rasterio.io.DatasetWriter, "write", disk_full)
    monkeypatch.setattr(raster_io, "free_space", lambda folder: 0)
    err = _fails_with(["segment", str(src), "-o", str(out_dir / "o.tif")], capsys)
    assert f"No space left on the device of OUTPUT ({out_dir}): up to 0.1 MB needed, 0.0 MB free" in err
    _assert_old_outputs_untouched(out_dir)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_really_full_disk(sample_raster, tmp_path, capsys):
    """The same on a real 16 KiB file system (where the system allows mounting one)."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        err = _fails_with(["segment", str(sample_raster), "-o", str(small / "o.tif")], capsys)
        assert f"No space left on the device of OUTPUT ({small})" in err and "MB needed" in err
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_failing_aux_rename_leaves_the_old_output_and_its_aux(crop_raster, tmp_path, capsys, monkeypatch):
    """The outputs are swapped in all or none: the .aux.xml failing after the GeoTIFF moved puts both back."""
    src = crop_raster(32, 32)
    out_dir = tmp_path / "out"
    _old_outputs(out_dir)
    replace = os.replace

    def refuse_the_aux(source, target):
        if str(target).endswith("o.tif.aux.xml") and ".cat.xml" in str(source):
            raise PermissionError(13, "Permission denied", str(target))
        return replace(source, target)

    monkeypatch.setattr(raster_io.os, "replace", refuse_the_aux)
    err = _fails_with(["segment", str(src), "-o", str(out_dir / "o.tif")], capsys)
    assert "Could not move the result into place" in err and "previous files there are unchanged" in err
    _assert_old_outputs_untouched(out_dir)


def test_a_run_removes_what_interrupted_runs_left(crop_raster, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs
    host = raster_io.HOST_TAG
    day_old = time.time() - 2 * 24 * 3600
    stale = [f".o.tif.{dead.pid}-{host}.abc12345.tmp.tif", f".o.tif.{dead.pid}-{host}.abc12345.tmp.tif.aux.xml",
             f".c.tif.{dead.pid}-{host}.x9y8z7w6.tmp.tif", f".other.tif.{dead.pid}-{host}.k2j3h4g5.tmp.tif.cat.xml",
             ".o.tif.q1w2e3r4.tmp.tif"]  # the naming before the process id was added, two days old
    kept = [f".o.tif.{os.getpid()}-{host}.live1234.tmp.tif",  # its process runs
            ".o.tif.fresh123.tmp.tif",  # old naming, touched recently: may belong to a run in progress
            f".o.tif.{dead.pid}-{'ffff' if host != 'ffff' else 'eeee'}.otherhst.tmp.tif",  # another host, recent
            ".notes.txt", "keep.tif"]
    for name in stale + kept:
        (out_dir / name).write_bytes(b"x")
    os.utime(out_dir / ".o.tif.q1w2e3r4.tmp.tif", (day_old, day_old))
    # A previous output moved aside for an instant while outputs were swapped, when the run died right then.
    (out_dir / f".prior.tif.{dead.pid}-{host}.abcdefgh.old").write_bytes(b"prior result")

    assert main(["segment", str(crop_raster(16, 16)), "-o", str(out_dir / "o.tif")]) == 0
    assert "Removed 5 temporary files that an interrupted run left in" in capsys.readouterr().err
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(kept + ["o.tif", "o.tif.aux.xml", "prior.tif"])
    assert (out_dir / "prior.tif").read_bytes() == b"prior result"


def test_temporary_names_carry_the_process_and_the_host(crop_raster, tmp_path):
    with rasterio.open(crop_raster(16, 16)) as src:
        writer = raster_io.ConfidenceWriter(tmp_path / "c.tif", src, rasterio.windows.Window(0, 0, 16, 16), {})
        with writer:
            writer.write(np.zeros((16, 16), np.float32), 0, 0)
            match = raster_io.TEMP_NAME.match(writer.tmp.name)
            assert match and match["target"] == "c.tif" and int(match["pid"]) == os.getpid()
            raster_io.commit_all([writer])
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tif") == ["c.tif", "crop1.tif"]
