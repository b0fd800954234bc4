"""The `idgbr` command: help, exit statuses, one-line errors, progress output, Ctrl-C, reproducibility."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from idgbr import cli
from idgbr.cli import TerminalProgress, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("refine", "segment", "bench", "info", "serve", "train", "evaluate"):
        assert command in out


def test_refine_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["refine", "--help"])
    out = capsys.readouterr().out
    for option in ("--coarse", "--model", "--steps", "--device", "--bands", "--extent", "--extent-crs", "--tile",
                   "--overlap", "--band", "--vocabulary", "--min-confidence", "--confidence", "--seed", "--quiet",
                   "-o"):
        assert option in out
    assert "--guard-band" not in out  # a hidden, deprecated alias of --band
    assert "model card" in out


def test_rule_values_are_parsed_with_one_line_errors():
    assert cli.parse_rule("off", "--band") == -1 and cli.parse_rule("OFF", "--band") == -1
    assert cli.parse_rule("12", "--band") == 12 and cli.parse_rule(None, "--band") is None
    with pytest.raises(cli.IdgbrError, match="--vocabulary must be a whole number of pixels or 'off'"):
        cli.parse_rule("wide", "--vocabulary")
    with pytest.raises(cli.IdgbrError, match="--min-confidence must be a number from 0 to 1"):
        cli.parse_probability("sure", "--min-confidence")


@pytest.mark.parametrize("args, message", [
    (["--band", "2000"], "band must be a whole number from -1 to 1024"),
    (["--band", "near"], "--band must be a whole number of pixels or 'off'"),
    (["--min-confidence", "2"], "min confidence must be a number from 0 to 1"),
])
def test_bad_rule_values_exit_1_with_one_line(crop_raster, tmp_path, capsys, args, message):
    out = tmp_path / "o.tif"
    assert main(["refine", str(crop_raster(16, 16)), "-o", str(out), *args]) == cli.EXIT_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idgbr: error: ") and message in err[0]
    assert not out.exists()


def test_confidence_in_segment_mode_is_refused_and_nothing_is_written(crop_raster, tmp_path, capsys):
    src = crop_raster(16, 16)
    out, conf = tmp_path / "out" / "o.tif", tmp_path / "out" / "c.tif"
    out.parent.mkdir()
    assert main(["segment", str(src), "-o", str(out), "--confidence", str(conf)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "segment mode has none" in err and "--confidence" in err
    assert list(out.parent.iterdir()) == []


def _coarse_with_boundaries(crop_raster, sample_labels):
    """A 96 x 96 crop of the sample and its labels as the coarse map (no nodata, several classes)."""
    src = crop_raster(96, 96, col=400, row=300)
    coarse = crop_raster(96, 96, col=400, row=300, source=sample_labels, nodata=None)
    with rasterio.open(coarse) as ds:
        ids = ds.read(1)
    assert len(np.unique(ids)) > 1
    if (ids == 255).any():  # unlabelled pixels would be written as nodata: give them a class
        ids[ids == 255] = 1
        with rasterio.open(coarse, "r+") as ds:
            ds.write(ids, 1)
    return src, coarse, ids


@pytest.mark.parametrize("rule", [["--band", "0"], ["--min-confidence", "1.0"]])
def test_rules_that_allow_no_change_return_the_coarse_map(bundled_model, crop_raster, sample_labels, tmp_path,
                                                           rule):
    src, coarse, ids = _coarse_with_boundaries(crop_raster, sample_labels)
    out = tmp_path / "kept.tif"
    args = ["refine", str(src), "-o", str(out), "--coarse", str(coarse), "--steps", "1", "-q"]
    assert main([*args, "--band", "off", "--vocabulary", "off", *rule]) == 0
    with rasterio.open(out) as ds:
        np.testing.assert_array_equal(ds.read(1), ids)


def test_confidence_output_on_the_input_grid(bundled_model, crop_raster, tmp_path, capsys):
    src = crop_raster(96, 80, col=400, row=300)
    out, conf = tmp_path / "o.tif", tmp_path / "conf.tif"
    assert main(["refine", str(src), "-o", str(out), "--confidence", str(conf), "--steps", "1", "--tile", "64",
                 "--overlap", "16", "--band", "6", "--vocabulary", "off", "--min-confidence", "0.4"]) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {conf}" in printed and "band 6 px, vocabulary off, min confidence 0.4" in printed
    with rasterio.open(src) as a, rasterio.open(out) as b, rasterio.open(conf) as c:
        assert c.dtypes == ("float32",) and c.count == 1
        assert (c.crs, c.transform, c.shape) == (a.crs, a.transform, a.shape)
        values, valid = c.read(1), b.read(1) != 255
        assert ((values[valid] >= 0) & (values[valid] <= 1)).all()
        assert (b.tags()["IDGBR_BAND"], b.tags()["IDGBR_VOCABULARY"], b.tags()["IDGBR_MIN_CONFIDENCE"]) == (
            "6", "-1", "0.4")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_negative_extent_values_are_accepted_after_the_option():
    assert cli._join_negative_values(["--extent", "-101.7,40,-101.6,40.1", "-q"]) == [
        "--extent=-101.7,40,-101.6,40.1", "-q"]


def test_module_entry_point_gives_one_line_error_and_status_1(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-m", "idgbr", "segment", str(tmp_path / "missing.tif"), "-o",
                           str(tmp_path / "o.tif")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"idgbr: error: INPUT not found: {tmp_path / 'missing.tif'}. Check the path (and the working folder)."]


def test_refine_writes_output_summary_and_is_reproducible(bundled_model, crop_raster, tmp_path, capsys):
    src = crop_raster(96, 80, col=400, row=300)
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    assert main(["refine", str(src), "-o", str(a), "--steps", "1", "--tile", "64", "--overlap", "16"]) == 0
    captured = capsys.readouterr()
    assert f"Wrote {a}: 96 x 80 px" in captured.out and "tiles" in captured.out
    assert main(["refine", str(src), "-o", str(b), "--steps", "1", "--tile", "64", "--overlap", "16", "-q"]) == 0
    assert capsys.readouterr().out == ""
    with rasterio.open(a) as ra, rasterio.open(b) as rb:
        np.testing.assert_array_equal(ra.read(), rb.read())
        assert ra.tags()["IDGBR_MODEL"] == "dubai5" and ra.tags()["IDGBR_MODE"] == "refine"


def test_refine_with_a_coarse_map_from_another_model(bundled_model, crop_raster, sample_labels, tmp_path):
    src = crop_raster(64, 64, col=200, row=200)
    coarse = crop_raster(64, 64, col=200, row=200, source=sample_labels)
    out = tmp_path / "o.tif"
    assert main(["refine", str(src), "-o", str(out), "--coarse", str(coarse), "--steps", "1", "-q"]) == 0
    with rasterio.open(out) as dst:
        assert dst.shape == (64, 64) and set(np.unique(dst.read(1))) <= {0, 1, 2, 3, 4, 255}


def test_progress_bar_draws_in_place_and_quiet_is_silent(bundled_model, crop_raster, tmp_path, capsys, monkeypatch):
    class FakeTTY:
        def __init__(self):
            self.text = ""

        def write(self, text):
            self.text += text

        def flush(self):
            pass

        def isatty(self):
            return True

    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    src = crop_raster(64, 64)
    assert main(["segment", str(src), "-o", str(tmp_path / "a.tif"), "--tile", "32", "--overlap", "8"]) == 0
    assert "\r" in tty.text and "100.0%" in tty.text and "MP/s" in tty.text and "ETA" in tty.text
    tty.text = ""
    assert main(["segment", str(src), "-o", str(tmp_path / "b.tif"), "--quiet"]) == 0
    assert tty.text == ""


def test_terminal_progress_throttles_but_always_draws_the_end():
    class Sink:
        text = ""

        def write(self, t):
            Sink.text += t

        def flush(self):
            pass

    bar = TerminalProgress(Sink(), min_interval=60)
    bar(0.1, "a")
    bar(0.2, "b")  # throttled
    bar(1.0, "done")
    bar.close()
    assert "a" in Sink.text and " b" not in Sink.text and "done" in Sink.text and Sink.text.endswith("\n")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize(("signum", "status", "words"), [
    (signal.SIGINT, cli.EXIT_CANCELLED, "interrupted; no output was written"),
    (signal.SIGTERM, 128 + signal.SIGTERM, "stopped by SIGTERM; no output was written"),
    (getattr(signal, "SIGHUP", 1), 129, "stopped by SIGHUP; no output was written"),
], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_ctrl_c_stops_quickly_and_leaves_no_output(bundled_model, crop_raster, tmp_path, signum, status, words):
    """Ctrl-C, and SIGTERM or SIGHUP alike, in the middle of a run: the temporary output is removed. The run
    is held at a known point (its temporary outputs exist) by the pipeline's test hook until the signal comes,
    so the test does not depend on how fast the machine is."""
    src = crop_raster(96, 96, col=400, row=300)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    hold = tmp_path / "held"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "IDGBR_TEST_HOLD": str(hold)}
    proc = subprocess.Popen([sys.executable, "-m", "idgbr", "refine", str(src), "-o", str(out_dir / "out.tif"),
                             "--confidence", str(out_dir / "conf.tif"), "-q"], stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        deadline = time.monotonic() + 300  # only against a hang: the run waits at the hold for the signal
        while not hold.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hold.exists() and proc.poll() is None, "the run did not reach the hold point"
        assert len(list(out_dir.glob(".out.tif.*.tmp.tif"))) == 1 and len(list(out_dir.glob(".conf.tif.*"))) == 1
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == status, err
    assert words in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["polish", "x.tif"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_temp_files_are_beside_the_output(bundled_model, crop_raster, tmp_path):
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    assert main(["segment", str(crop_raster(16, 16)), "-o", str(out_dir / "seg.tif"), "-q"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == ["seg.tif", "seg.tif.aux.xml"]
    assert Path(out_dir / "seg.tif").stat().st_size > 0
