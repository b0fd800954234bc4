"""Every bad input the issue lists gets one clear message (and exit status 1 from the command), and the
awkward-but-valid rasters (non-8-bit, EPSG:4326, no CRS, nodata, 1x1) still work. Real bundled model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from idgbr.cli import main


@pytest.fixture(autouse=True)
def _model(bundled_model):
    return bundled_model


def fails(args: list[str], capsys) -> str:
    """Run the command, expect exit status 1 and a single 'idgbr: error:' message without traceback."""
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "idgbr: error:" in err and "Traceback" not in err
    return err


def test_missing_input(tmp_path, capsys):
    err = fails(["refine", str(tmp_path / "nope.tif"), "-o", str(tmp_path / "o.tif")], capsys)
    assert "INPUT not found" in err and "nope.tif" in err


def test_not_a_raster(tmp_path, capsys):
    bogus = tmp_path / "notes.tif"
    bogus.write_text("this is not a raster\n")
    err = fails(["segment", str(bogus), "-o", str(tmp_path / "o.tif")], capsys)
    assert "not a raster GDAL can read" in err


def test_fewer_bands_than_the_model_needs(crop_raster, tmp_path, capsys):
    one_band = crop_raster(32, 32, bands=[1])
    err = fails(["segment", str(one_band), "-o", str(tmp_path / "o.tif")], capsys)
    assert "has 1 band but the model needs 3" in err and "--bands 1,1,1" in err
    assert main(["segment", str(one_band), "-o", str(tmp_path / "o.tif"), "--bands", "1,1,1", "-q"]) == 0
    err = fails(["segment", str(one_band), "-o", str(tmp_path / "o.tif"), "--bands", "1,2,3"], capsys)
    assert "Band 2, 3 does not exist" in err


def test_non_8bit_input_is_stretched_by_robust_statistics(crop_raster, tmp_path, capsys):
    wide = crop_raster(48, 40, dtype="uint16", scale=40.0)
    out = tmp_path / "o.tif"
    assert main(["refine", str(wide), "-o", str(out), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "uint16, not 8-bit" in err and "robust statistics" in err and "2-98 % percentiles" in err
    with rasterio.open(out) as dst:
        assert dst.dtypes == ("uint8",) and dst.shape == (40, 48)


def test_real_uint16_utm_sample(geotiff_samples, tmp_path):
    src = geotiff_samples / "sample_geotiff.tif"  # 1 band uint16, nodata 0
    with rasterio.open(src) as s:
        b = s.bounds
    out = tmp_path / "o.tif"
    extent = f"{b.left + 100},{b.top - 40},{b.left + 132},{b.top - 8}"
    assert main(["segment", str(src), "-o", str(out), "--bands", "1,1,1", "--extent", extent, "-q"]) == 0
    with rasterio.open(out) as dst:
        assert dst.crs.to_epsg() == 32616 and dst.shape == (64, 64)


def test_geographic_crs_with_nodata(geotiff_samples, tmp_path, capsys):
    src = geotiff_samples / "nebraska_landsat5_with_nodata_wgs84.tif"  # int16, EPSG:4326, nodata -9999
    with rasterio.open(src) as s:
        b = s.bounds
        # the lower-left corner of the scene is nodata (Landsat footprint is tilted)
        extent = (b.left, b.bottom, b.left + 40 * s.res[0], b.bottom + 40 * s.res[1])
        truth = s.read(1, window=s.window(*extent)) != -9999
    out = tmp_path / "o.tif"
    args = ["segment", str(src), "-o", str(out), "--bands", "1,1,1", "--extent", ",".join(map(str, extent))]
    # Landsat is about 30 m per pixel: too coarse for the model (issue 13), unless told otherwise.
    err = fails(args, capsys)
    assert "m per pixel; dubai5 works from 0.25 to 1 m" in err and not out.exists()
    assert main([*args, "--pixel-size", "0.5", "-q"]) == 0
    with rasterio.open(out) as dst:
        ids = dst.read(1)
        assert dst.crs.to_epsg() == 4326 and ids.shape == truth.shape
    assert ((ids == 255) == ~truth).all() and (~truth).any()


def test_geographic_crs_synthetic(crop_raster, tmp_path, capsys):
    src = crop_raster(40, 30, crs="EPSG:4326", transform=from_origin(55.2, 25.1, 5e-6, 5e-6))
    out = tmp_path / "o.tif"
    assert main(["segment", str(src), "-o", str(out), "--extent", "55.20001,25.09990,55.20010,25.09999",
                 "--extent-crs", "EPSG:4326", "-q"]) == 0
    with rasterio.open(out) as dst:
        assert dst.crs.to_epsg() == 4326 and dst.shape == (18, 18)


def test_no_crs_keeps_the_pixel_grid_and_rejects_a_crs_extent(crop_raster, tmp_path, capsys):
    src = crop_raster(40, 30, crs=None, transform=None)
    out = tmp_path / "o.tif"
    assert main(["segment", str(src), "-o", str(out), "-q"]) == 0
    with rasterio.open(out) as dst:
        assert dst.crs is None and dst.shape == (30, 40)
    err = fails(["segment", str(src), "-o", str(out), "--extent", "1,1,5,5", "--extent-crs", "EPSG:4326"], capsys)
    assert "INPUT has no CRS" in err


def test_nodata_region_and_internal_mask(crop_raster, raster_writer, tmp_path):
    with rasterio.open(crop_raster(64, 48)) as s:
        data, crs, transform = s.read(), s.crs, s.transform
    data[:, :, :16] = 0
    nodata_src = raster_writer("nd.tif", data, crs=crs, transform=transform, nodata=0)
    assert main(["refine", str(nodata_src), "-o", str(tmp_path / "a.tif"), "--steps", "1", "-q"]) == 0
    with rasterio.open(tmp_path / "a.tif") as dst:
        ids = dst.read(1)
    assert (ids[:, :16] == 255).all() and (ids[:, 16:] < 5).all()

    masked = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
            masked, "w", driver="GTiff", width=64, height=48, count=3, dtype="uint8", crs=crs,
            transform=transform) as dst:
        dst.write(data)
        mask = np.full((48, 64), 255, np.uint8)
        mask[30:, :] = 0
        dst.write_mask(mask)
    assert main(["segment", str(masked), "-o", str(tmp_path / "b.tif"), "-q"]) == 0
    with rasterio.open(tmp_path / "b.tif") as dst:
        ids = dst.read(1)
    assert (ids[30:] == 255).all() and (ids[:30, 16:] < 5).all()


def test_extent_outside_or_empty(crop_raster, tmp_path, capsys):
    src = crop_raster(32, 32)
    with rasterio.open(src) as s:
        b = s.bounds
    out = str(tmp_path / "o.tif")
    err = fails(["segment", str(src), "-o", out, "--extent", f"{b.right + 10},{b.bottom},{b.right + 20},{b.top}"],
                capsys)
    assert "does not overlap INPUT" in err
    err = fails(["segment", str(src), "-o", out, "--extent", f"{b.left + 2},{b.bottom},{b.left + 2},{b.top}"],
                capsys)
    assert "zero or negative size" in err
    err = fails(["segment", str(src), "-o", out, "--extent", "1,2,3"], capsys)
    assert "four numbers" in err
    assert not Path(out).exists()


def test_one_pixel_raster(crop_raster, tmp_path):
    out = tmp_path / "o.tif"
    assert main(["refine", str(crop_raster(1, 1)), "-o", str(out), "--steps", "1", "-q"]) == 0
    with rasterio.open(out) as dst:
        assert dst.shape == (1, 1) and dst.read(1)[0, 0] < 5


def test_corrupt_weights(crop_raster, tmp_path, capsys, bundled_model):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(bundled_model.read_bytes()[:5000])
    err = fails(["segment", str(crop_raster(16, 16)), "-o", str(tmp_path / "o.tif"), "--model", str(broken)],
                capsys)
    assert "broken.safetensors" in err
    assert not (tmp_path / "o.tif").exists()


def test_output_not_writable(crop_raster, tmp_path, capsys):
    src = str(crop_raster(16, 16))
    err = fails(["segment", src, "-o", str(tmp_path / "missing" / "o.tif")], capsys)
    assert "does not exist" in err
    if os.geteuid() == 0:  # root ignores permissions: use a folder no one can create files in
        if not Path("/proc").is_dir():
            pytest.skip("no /proc on this system")
        target = Path("/proc/idgbr-out.tif")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = locked / "o.tif"
    err = fails(["segment", src, "-o", str(target)], capsys)
    assert "Cannot write OUTPUT" in err


def test_output_equal_to_input(crop_raster, tmp_path, capsys):
    src = crop_raster(16, 16)
    before = src.read_bytes()
    err = fails(["refine", str(src), "-o", str(src)], capsys)
    assert "same file as INPUT" in err
    assert src.read_bytes() == before


def _truncated(source: Path, path: Path, size: int) -> Path:
    path.write_bytes(source.read_bytes()[:size])  # as `head -c SIZE source > path`
    return path


def test_truncated_input(sample_raster, tmp_path, capsys):
    broken = _truncated(sample_raster, tmp_path / "t.tif", 300_000)
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    err = fails(["segment", str(broken), "-o", str(out)], capsys)
    assert f"INPUT is damaged or truncated: {broken} cannot be read" in err and "Copy or download it again" in err
    assert list(out.parent.iterdir()) == []


def test_truncated_coarse_map(sample_raster, raster_writer, tmp_path, capsys):
    with rasterio.open(sample_raster) as s:
        crs, transform, shape = s.crs, s.transform, s.shape
    ids = np.random.default_rng(0).integers(0, 5, shape, dtype=np.uint8)  # noisy: compresses badly, so is large
    whole = raster_writer("coarse.tif", ids, crs=crs, transform=transform, tiled=True, blockxsize=256,
                          blockysize=256, compress="deflate")
    broken = _truncated(whole, tmp_path / "coarse_cut.tif", whole.stat().st_size // 3)
    out = tmp_path / "out" / "o.tif"
    out.parent.mkdir()
    err = fails(["refine", str(sample_raster), "--coarse", str(broken), "-o", str(out)], capsys)
    assert f"The coarse map is damaged or truncated: {broken} cannot be read" in err
    assert list(out.parent.iterdir()) == []


def test_coarse_map_elsewhere_is_refused_naming_both_extents(crop_raster, raster_writer, tmp_path, capsys):
    src = crop_raster(64, 64)
    with rasterio.open(src) as s:
        b, crs = s.bounds, s.crs
    # A valid class map of the same size, 5 km east.
    far = raster_writer("far.tif", np.zeros((64, 64), np.uint8), crs=crs,
                        transform=from_origin(b.left + 5000, b.top, 0.5, 0.5))
    with rasterio.open(far) as f:
        fb = f.bounds
    out = tmp_path / "o.tif"
    err = fails(["refine", str(src), "--coarse", str(far), "-o", str(out)], capsys)
    assert "does not overlap INPUT" in err
    # Both extents, in plain notation (not 2.79e+06).
    assert f"{fb.left:.0f},{fb.bottom:.0f},{fb.right:.0f},{fb.top:.0f} (EPSG:32640)" in err
    assert f"{b.left:.0f},{b.bottom:.0f},{b.right:.0f},{b.top:.0f} (EPSG:32640)" in err
    assert "e+" not in err
    assert not out.exists()


def test_extent_partly_outside_is_clipped_with_a_note(crop_raster, tmp_path, capsys):
    src = crop_raster(32, 32)
    with rasterio.open(src) as s:
        b = s.bounds
    out = tmp_path / "o.tif"
    extent = f"{b.left + 4},{b.bottom - 100},{b.right + 100},{b.top - 4}"
    assert main(["segment", str(src), "-o", str(out), "--extent", extent]) == 0
    err = capsys.readouterr().err
    assert "reaches beyond INPUT: only its part inside the raster is processed" in err
    assert f"{b.left + 4:.0f},{b.bottom:.0f},{b.right:.0f},{b.top - 4:.0f} (EPSG:32640)" in err
    assert "e+" not in err
    with rasterio.open(out) as dst:
        assert dst.shape == (24, 24)


def test_coordinates_in_messages_are_plain(crop_raster, tmp_path, capsys):
    src = crop_raster(32, 32)
    err = fails(["segment", str(src), "-o", str(tmp_path / "o.tif"), "--extent", "2780000,2780000,2780100,2780100"],
                capsys)
    assert "The extent 2780000,2780000,2780100,2780100 does not overlap INPUT" in err and "e+" not in err


def test_coarse_map_over_part_of_input_is_noted(crop_raster, raster_writer, tmp_path, capsys):
    src = crop_raster(64, 64)
    with rasterio.open(src) as s:
        b, crs = s.bounds, s.crs
    # Class 1 on the left half of INPUT's area only, on a coarser grid (1 m pixels).
    half = raster_writer("half.tif", np.ones((32, 16), np.uint8), crs=crs, transform=from_origin(b.left, b.top, 1, 1))
    out = tmp_path / "o.tif"
    assert main(["refine", str(src), "--coarse", str(half), "-o", str(out), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "The coarse map half.tif covers only part of INPUT" in err and "outside it the output is nodata" in err
    with rasterio.open(out) as dst:
        ids = dst.read(1)
    assert (ids[:, :32] != 255).all() and (ids[:, 32:] == 255).all()


@pytest.mark.parametrize("fields, parameter", [
    ({"bands": [1, 2, 7]}, "bands"),
    ({"extent": (0.0, 0.0, 10.0, 10.0)}, "extent"),
    ({"steps": 0}, "steps"),
    ({"min_confidence": 2.0}, "min_confidence"),
    ({"pixel_size": -1.0}, "pixel_size"),
    ({"device": "tpu"}, "device"),
    ({"model": Path("/nonexistent/model.safetensors")}, "model"),
    ({"coarse": Path("/nonexistent/coarse.tif")}, "coarse"),
    ({"input": Path("/nonexistent/input.tif")}, "input"),
])
def test_errors_name_the_option_at_fault(crop_raster, tmp_path, fields, parameter):
    """What a caller needs to point at its own control: the RunOptions field, besides the message."""
    from idgbr.errors import IdgbrError
    from idgbr.pipeline import RunOptions, run

    options = {"input": crop_raster(32, 32), "output": tmp_path / "o.tif", **fields}
    with pytest.raises(IdgbrError) as info:
        run(RunOptions(**options))
    assert (info.value.parameter, info.value.code) == (parameter, "bad_parameter"), str(info.value)
    assert not (tmp_path / "o.tif").exists()
