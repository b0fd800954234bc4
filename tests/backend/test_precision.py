"""The networks' precision: which one a run takes on each device, the errors for unusable ones, and a bf16 run
of the bundled model."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from idgbr import cli, precision
from idgbr.checkpoint import read_card
from idgbr.cli import main
from idgbr.errors import IdgbrError
from idgbr.model_bundle import default_model_path
from idgbr.pipeline import RunOptions, run
from idgbr.precision import resolve_precision

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")


@pytest.mark.parametrize("bf16_units", [True, False])
def test_auto_takes_bf16_only_on_cpus_with_bf16_units(monkeypatch, bf16_units):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: bf16_units)
    assert resolve_precision("auto", CPU) == ("bf16" if bf16_units else "fp32")
    assert resolve_precision(" AUTO ", CPU) == resolve_precision("auto", CPU)
    assert resolve_precision(None, CPU) == resolve_precision("auto", CPU)  # auto is the default
    assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("auto", MPS) == "fp32"


@pytest.mark.parametrize("gpu_bf16", [True, False])
def test_auto_and_the_default_take_a_half_type_on_cuda(monkeypatch, gpu_bf16):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: gpu_bf16)
    half = "bf16" if gpu_bf16 else "fp16"
    assert resolve_precision("auto", CUDA) == resolve_precision(None, CUDA) == half
    assert resolve_precision("fp16", CUDA) == "fp16" and resolve_precision("fp32", CUDA) == "fp32"
    if not gpu_bf16:
        with pytest.raises(IdgbrError, match="This GPU has no bf16 support: use --precision fp16"):
            resolve_precision("bf16", CUDA)


@pytest.mark.parametrize("requested, device, message", [
    ("fp16", CPU, r"fp16 runs only on a CUDA GPU, and this run is on the CPU\. Use --precision bf16 .*, fp32 or auto"),
    ("fp16", MPS, r"fp16 runs only on a CUDA GPU, and this run is on the MPS\."),
    ("double", CPU, r"Unknown precision 'double': use auto, fp32, bf16 or fp16 \(fix --precision\)"),
])
def test_unusable_precisions_name_the_fix(requested, device, message):
    with pytest.raises(IdgbrError, match=message) as failure:
        resolve_precision(requested, device)
    assert failure.value.parameter == "precision"


def test_the_networks_autocast_only_for_half_types():
    assert precision.autocast("fp32", CPU).__class__.__name__ == "nullcontext"
    with precision.autocast("bf16", CPU):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_cli_has_the_option_and_refuses_fp16_on_the_cpu_in_one_line(crop_raster, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    assert "--precision" in capsys.readouterr().out
    out = tmp_path / "o.tif"
    for value, words in (("fp16", "fp16 runs only on a CUDA GPU"), ("fastest", "Unknown precision 'fastest'")):
        assert main(["segment", str(crop_raster(16, 16)), "-o", str(out), "--device", "cpu", "--precision",
                     value]) == cli.EXIT_ERROR
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("idgbr: error: ") and words in err[0]
        assert not out.exists()


def test_a_bf16_run_writes_a_valid_map_on_the_input_grid(bundled_model, crop_raster, tmp_path, capsys):
    src = crop_raster(256, 192, col=500, row=400)
    out = tmp_path / "bf16.tif"
    assert main(["refine", str(src), "-o", str(out), "--device", "cpu", "--precision", "bf16", "--steps", "1"]) == 0
    assert "on cpu (bf16)" in capsys.readouterr().out
    reference = run(RunOptions(input=src, output=tmp_path / "fp32.tif", device="cpu", steps=1, precision="fp32"))
    assert any(note.startswith("Precision: fp32") for note in reference.notes)
    with rasterio.open(src) as i, rasterio.open(out) as o, rasterio.open(tmp_path / "fp32.tif") as f:
        assert o.shape == i.shape and o.transform == i.transform and o.crs == i.crs and o.dtypes == ("uint8",)
        assert o.tags()["IDGBR_PRECISION"] == "bf16" and f.tags()["IDGBR_PRECISION"] == "fp32"
        ids, exact = o.read(1), f.read(1)
    assert set(np.unique(ids)) <= set(range(len(reference.classes)))
    # Half precision moves a few boundary pixels, no more.
    assert (ids == exact).mean() > 0.98


def test_bench_runs_each_precision_once_and_reports_them_side_by_side(monkeypatch):
    from idgbr import bench

    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert bench.bench_precisions("fp32, auto", "cpu") == ["fp32", "bf16"]
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert bench.bench_precisions("fp32,auto", "cpu") == ["fp32"]  # auto is fp32 here: measured once
    with pytest.raises(IdgbrError, match="fp16 runs only on a CUDA GPU"):
        bench.bench_precisions("fp32,fp16", "cpu")

    def row(precision: str, seconds: float) -> dict:
        return {"label": "mosaic", "width": 1000, "height": 1000, "mode": "refine", "precision": precision,
                "seconds": seconds, "tiles": 4, "tiles_refined": 3, "coarse_tiles": 4, "tile_shape": [512, 512],
                "peak_rss": int(0.5e9), "load": 1.0}

    card = read_card(default_model_path())
    report = bench.render_report([row("fp32", 3.0), row("bf16", 2.0)], {"cpu": "test"}, card,
                                 (None, None), {"steps": 1, "device": "cpu", "mosaic_size": 1000,
                                                "large_size": 2000, "large_rows": 128})
    assert "| mode | precision | s/MP |" in report
    assert "| refine | fp32 | 3.00 |" in report and "| refine | bf16 | 2.00 |" in report
    assert "at fp32: segment + refine <= 2.0 s/MP — measured 3.00 s/MP (NOT met)" in report
    assert "at bf16: segment + refine <= 2.0 s/MP — measured 2.00 s/MP (met)" in report
