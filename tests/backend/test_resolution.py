"""The models work at the user's resolution. The input's pixel size in metres (CRS, --pixel-size), the plan
(coarse segmenter at the working resolution outside the model's range, refiner as close to the input's
resolution as the range allows) and the output always on the input's grid. Real weights (the bundled
buildings2's) under a card fixed for these tests (working 0.3 m, default range 0.15-0.6 m), tiny rasters; the
shipped card's own values are checked at the end."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import from_origin
from rasterio.windows import Window

from idgbr.card import ModelCard
from idgbr.checkpoint import describe, load_checkpoint, read_card, save_checkpoint
from idgbr.cli import main
from idgbr.errors import IdgbrError
from idgbr.model_bundle import bundled_models
from idgbr.pipeline import RunOptions, run
from idgbr.raster.resample import VirtualGrid, nearest_index
from idgbr.resolution import (
    detect_pixel_size,
    pixel_size_range,
    plan_resolution,
)

BUNDLED = "buildings2"
MODEL = ""  # the fixed-card copy of the bundled model, written by _model


@pytest.fixture(scope="module", autouse=True)
def _model(tmp_path_factory):
    """buildings2's weights with working 0.3 m and no range of its own, so that these tests do not follow the
    shipped card's numbers."""
    global MODEL
    if BUNDLED not in bundled_models():
        pytest.skip(f"bundled model {BUNDLED} not present")
    tensors, shipped = load_checkpoint(bundled_models()[BUNDLED])
    path = tmp_path_factory.mktemp("model") / f"{BUNDLED}.safetensors"
    save_checkpoint(path, tensors, dataclasses.replace(shipped, pixel_size_m=0.3, pixel_size_range_m=None))
    MODEL = str(path)


@pytest.fixture
def at_pixel(sample_raster, raster_writer):
    """at(metres, width=120, height=96, crs="EPSG:32640") -> a raster cut from the sample with that pixel size
    (the same pixels, another transform)."""

    def at(metres: float | None, width: int = 120, height: int = 96, crs="EPSG:32640", transform=None):
        with rasterio.open(sample_raster) as src:
            data = src.read(window=Window(200, 300, width, height))
        if transform is None and metres is not None:
            transform = from_origin(320000, 2790000, metres, metres)
        return raster_writer(f"in_{metres}_{crs}.tif".replace(":", "_"), data, crs=crs, transform=transform)

    return at


def card(**changes) -> ModelCard:
    """The test model's card (working 0.3 m, no range of its own), with CHANGES."""
    return dataclasses.replace(read_card(Path(MODEL)), **changes)


def fails(args: list[str], capsys) -> str:
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "idgbr: error:" in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------- the plan

def test_default_range_is_half_to_twice_the_working_value():
    assert pixel_size_range(card(pixel_size_m=0.5)) == (0.25, 1.0)
    assert pixel_size_range(card(pixel_size_m=0.3, pixel_size_range_m=[0.1, 0.8])) == (0.1, 0.8)


@pytest.mark.parametrize("value", [[0.6, 0.2], [0, 1], [0.1], "0.1,1", [0.4, 0.8], [0.1, math.inf]])
def test_bad_range_in_a_card(value):
    with pytest.raises(IdgbrError, match="invalid: pixel_size_range_m"):
        ModelCard.from_dict({**card().to_dict(), "pixel_size_m": 0.3, "pixel_size_range_m": value})


def test_the_card_checks_the_range_and_info_shows_it():
    data = card().to_dict()
    assert "valid from 0.15 to 0.6 m" in describe(card())
    with pytest.raises(IdgbrError, match="pixel_size_range_m"):
        ModelCard.from_dict({**data, "pixel_size_range_m": [0.5, 0.1]})
    wide = ModelCard.from_dict({**data, "pixel_size_range_m": [0.05, 1.2]})
    assert wide.pixel_size_range_m == [0.05, 1.2]
    assert "valid from 0.05 to 1.2 m" in describe(wide)


@pytest.mark.parametrize("input_m, coarse_m, refine_m", [
    (0.05, 0.3, 0.15),  # finer: coarse at working, refiner at the finest valid
    (0.3, 0.3, 0.3),  # inside: all native
    (0.5, 0.5, 0.5),
    (2.0, 0.3, 0.6),  # coarser: coarse at working, refiner at the coarsest valid
])
def test_plan(input_m, coarse_m, refine_m):
    plan = plan_resolution(input_m, card(), "buildings2")
    assert (plan.coarse_m, plan.refine_m) == pytest.approx((coarse_m, refine_m))


def test_plan_refuses_rasters_coarser_than_10_m():
    with pytest.raises(IdgbrError, match="INPUT is 30 m per pixel; dubai5 works from 0.25 to 1 m"):
        plan_resolution(30.0, card(pixel_size_m=0.5), "dubai5")


def test_virtual_grid_and_nearest_mapping(sample_raster):
    with rasterio.open(sample_raster) as src:
        grid = VirtualGrid.at_factor(src, Window(100, 50, 600, 300), 6.0)
        assert (grid.width, grid.height) == (100, 50)
        assert grid.transform.a == pytest.approx(src.transform.a * 6)
        block = grid.read([1], Window(0, 0, 10, 5))
        direct = src.read(1, window=Window(100, 50, 60, 30)).astype(float).reshape(5, 6, 10, 6).mean(axis=(1, 3))
        assert np.abs(block[0].astype(float) - direct).max() <= 1  # area average
    index = nearest_index(12, 2)
    assert index.tolist() == [0] * 6 + [1] * 6


# ------------------------------------------------------------------------------------------ runs, grids

@pytest.mark.parametrize("metres", [0.05, 0.5, 2.0])
def test_output_grid_is_the_input_grid(at_pixel, tmp_path, metres):
    src = at_pixel(metres)
    out, conf = tmp_path / "o.tif", tmp_path / "c.tif"
    result = run(RunOptions(input=src, output=out, model=MODEL, steps=1, confidence=conf, device="cpu"))
    with rasterio.open(src) as i, rasterio.open(out) as o, rasterio.open(conf) as c:
        for dst in (o, c):
            assert dst.shape == i.shape and dst.transform == i.transform and dst.crs == i.crs
        ids = o.read(1)
    assert set(np.unique(ids)) <= {0, 1}
    assert sum(result.class_pixels.values()) + result.nodata_pixels == ids.size
    assert result.input_pixel_m == pytest.approx(metres)


def test_notes_say_what_was_done(at_pixel, tmp_path):
    result = run(RunOptions(input=at_pixel(0.05), output=tmp_path / "o.tif", model=MODEL, steps=1, device="cpu"))
    assert "INPUT is 0.05 m per pixel; segmented at 0.3 m, refined at 0.15 m, written at 0.05 m" in result.notes
    assert (result.coarse_pixel_m, result.refine_pixel_m) == pytest.approx((0.3, 0.15))
    with rasterio.open(tmp_path / "o.tif") as o:
        assert o.tags()["IDGBR_REFINE_PIXEL_M"] == "0.15"
    seg = run(RunOptions(input=at_pixel(0.05), output=tmp_path / "s.tif", mode="segment", model=MODEL,
                         device="cpu"))
    assert "INPUT is 0.05 m per pixel; segmented at 0.3 m, written at 0.05 m" in seg.notes


def test_segment_at_working_resolution_matches_a_native_run(at_pixel, sample_raster, raster_writer, tmp_path):
    """A 0.05 m raster made by repeating each pixel of a 0.3 m one 6 x 6 times segments like the 0.3 m one."""
    native = at_pixel(0.3, width=64, height=48)
    with rasterio.open(native) as s:
        data = s.read()
    fine = raster_writer("fine.tif", np.repeat(np.repeat(data, 6, axis=1), 6, axis=2), crs="EPSG:32640",
                         transform=from_origin(320000, 2790000, 0.05, 0.05))
    run(RunOptions(input=native, output=tmp_path / "a.tif", mode="segment", model=MODEL, device="cpu"))
    run(RunOptions(input=fine, output=tmp_path / "b.tif", mode="segment", model=MODEL, device="cpu"))
    with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
        expected = np.repeat(np.repeat(a.read(1), 6, axis=0), 6, axis=1)
        assert (b.read(1) == expected).mean() > 0.99


def test_coarse_map_is_read_on_the_refine_grid(at_pixel, raster_writer, tmp_path):
    src = at_pixel(0.05)
    with rasterio.open(src) as s:
        ids = np.zeros((s.height, s.width), np.uint8)
        ids[:, s.width // 2:] = 1
        coarse = raster_writer("coarse.tif", ids, crs=s.crs, transform=s.transform)
    result = run(RunOptions(input=src, output=tmp_path / "o.tif", coarse=coarse, model=MODEL, steps=1,
                            device="cpu"))
    assert "INPUT is 0.05 m per pixel; refined at 0.15 m, written at 0.05 m" in result.notes
    with rasterio.open(tmp_path / "o.tif") as o:
        assert o.shape == ids.shape


def test_input_nodata_is_kept_at_the_input_resolution(sample_raster, raster_writer, tmp_path):
    with rasterio.open(sample_raster) as s:
        data = s.read(window=Window(0, 0, 120, 96))
    data[:, :, :7] = 0  # 7 columns: not a whole number of 0.3 m pixels at 0.05 m
    src = raster_writer("nd.tif", data, crs="EPSG:32640", transform=from_origin(320000, 2790000, 0.05, 0.05),
                        nodata=0)
    run(RunOptions(input=src, output=tmp_path / "o.tif", model=MODEL, steps=1, device="cpu"))
    with rasterio.open(tmp_path / "o.tif") as o:
        ids = o.read(1)
    assert (ids[:, :7] == 255).all() and (ids[:, 7:] != 255).all()


# ------------------------------------------------------------------------------------------ CRS and override

def test_no_crs_without_and_with_pixel_size(at_pixel, tmp_path, capsys):
    src = at_pixel(None, crs=None)
    out = tmp_path / "o.tif"
    assert main(["segment", str(src), "-o", str(out), "--model", MODEL]) == 0
    err = capsys.readouterr().err
    assert "INPUT has no CRS, so its pixel size is unknown: taken as 0.3 m" in err
    assert "INPUT is 0.3 m per pixel; segmented at 0.3 m, written at 0.3 m" in err
    assert main(["segment", str(src), "-o", str(out), "--model", MODEL, "--pixel-size", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "INPUT is 0.05 m per pixel; segmented at 0.3 m, written at 0.05 m" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # wanted here
        with rasterio.open(src) as i, rasterio.open(out) as o:
            assert o.shape == i.shape and o.crs is None


def test_pixel_size_overrides_the_crs(at_pixel, tmp_path):
    result = run(RunOptions(input=at_pixel(0.3), output=tmp_path / "o.tif", mode="segment", model=MODEL,
                            pixel_size=2.0, device="cpu"))
    assert "INPUT's pixel size given: 2 m (its georeference says 0.3 m)." in result.notes
    assert result.coarse_pixel_m == pytest.approx(0.3) and result.input_pixel_m == 2.0


def test_geographic_crs(sample_raster, raster_writer, tmp_path):
    with rasterio.open(sample_raster) as s:
        data = s.read(window=Window(0, 0, 120, 96))
    # 5e-7 degrees at 25 N: about 0.05 m east-west, 0.055 m north-south.
    src = raster_writer("geo.tif", data, crs="EPSG:4326", transform=from_origin(55.2, 25.1, 5e-7, 5e-7))
    with rasterio.open(src) as s:
        metres, note = detect_pixel_size(s, Window(0, 0, s.width, s.height), card())
    assert note is None and 0.05 < metres < 0.056
    result = run(RunOptions(input=src, output=tmp_path / "o.tif", mode="segment", model=MODEL, device="cpu"))
    assert result.coarse_pixel_m == pytest.approx(0.3)
    with rasterio.open(src) as i, rasterio.open(tmp_path / "o.tif") as o:
        assert o.shape == i.shape and o.transform == i.transform and o.crs == i.crs


# ------------------------------------------------------------------------------------------ bad values

@pytest.mark.parametrize("value, words", [("0", "positive number of metres"), ("-1", "positive number of metres"),
                                          ("abc", "number of metres"),
                                          ("30", "INPUT is 30 m per pixel; buildings2 works from 0.15 to 0.6 m")])
def test_bad_pixel_size_writes_nothing(at_pixel, tmp_path, capsys, value, words):
    out = tmp_path / "o.tif"
    err = fails(["refine", str(at_pixel(0.3)), "-o", str(out), "--model", MODEL, "--pixel-size", value], capsys)
    assert words in err
    assert list(tmp_path.glob("o.tif*")) == [] and list(tmp_path.glob(".o.tif*")) == []


def test_too_coarse_raster_writes_nothing(at_pixel, tmp_path, capsys):
    out = tmp_path / "o.tif"
    err = fails(["segment", str(at_pixel(12.0)), "-o", str(out), "--model", MODEL], capsys)
    assert "INPUT is 12 m per pixel; buildings2 works from 0.15 to 0.6 m" in err
    assert not out.exists()


def test_nonsense_latitude(sample_raster, raster_writer, tmp_path, capsys):
    with rasterio.open(sample_raster) as s:
        data = s.read(window=Window(0, 0, 40, 30))
    src = raster_writer("bad.tif", data, crs="EPSG:4326", transform=from_origin(55.2, 250.0, 5e-6, 5e-6))
    out = tmp_path / "o.tif"
    err = fails(["segment", str(src), "-o", str(out), "--model", MODEL], capsys)
    assert "outside -90..90" in err and not out.exists()
    # The override does not need the latitude.
    assert main(["segment", str(src), "-o", str(out), "--model", MODEL, "--pixel-size", "0.3", "-q"]) == 0


def test_service_job_field(sample_raster, tmp_path):
    from idgbr.service.app import JobRequest, _check_job
    from idgbr.service.models import ModelCatalog

    request = JobRequest(input=str(sample_raster), output=str(tmp_path / "o.tif"), model=MODEL, pixel_size=0.05)
    fields = _check_job(request, ModelCatalog())
    assert fields["pixel_size"] == 0.05
    assert RunOptions(**fields).pixel_size == 0.05


def test_upsampled_writer_writes_every_input_pixel_once_on_block_rows():
    """Nearest upsampling of rows arriving in odd batches over two column ranges equals the direct mapping; every
    write but the held-back tails starts on a GeoTIFF block row."""
    from idgbr.raster.resample import UpsampledWriter

    class Grid:
        def __init__(self, rows, cols, height, width):
            self.window, self.height, self.width = Window(0, 0, cols, rows), height, width

    class Target:
        def __init__(self, rows, cols):
            self.values, self.count, self.starts = np.zeros((rows, cols), np.uint8), np.zeros((rows, cols)), []

        def write(self, values, row, col):
            self.values[row:row + values.shape[0], col:col + values.shape[1]] = values
            self.count[row:row + values.shape[0], col:col + values.shape[1]] += 1
            self.starts.append(row)

    rng = np.random.default_rng(0)
    for rows, cols, height, width in [(1000, 700, 167, 117), (600, 520, 600, 520), (3000, 90, 300, 9),
                                      (37, 41, 200, 210)]:
        values = rng.integers(0, 5, (height, width)).astype(np.uint8)
        target = Target(rows, cols)
        writer = UpsampledWriter(target, Grid(rows, cols, height, width), 255, count_classes=True)
        for c0, c1 in ((0, width // 2), (width // 2, width)):
            row = 0
            for step in (13, 256, 1, 100, 10**6):
                if row < height:
                    writer.write(values[row:row + step, c0:c1], row, c0)
                    row = min(height, row + step)
        writer.flush()
        expected = values[nearest_index(rows, height)][:, nearest_index(cols, width)]
        assert (target.values == expected).all() and (target.count == 1).all()
        assert all(start % 256 == 0 for start in target.starts)
        assert writer.class_hist.sum() == rows * cols


def test_shipped_building_model_segments_drone_mosaics_at_its_working_resolution(at_pixel, tmp_path):
    """The shipped buildings2 card: a 5 cm raster is segmented at the working resolution and refined at the finest
    resolution the model is valid at, whatever those are."""
    shipped = read_card(bundled_models()[BUNDLED])
    low, _ = pixel_size_range(shipped)
    assert low <= shipped.pixel_size_m
    result = run(RunOptions(input=at_pixel(0.05), output=tmp_path / "o.tif", model=BUNDLED, steps=1, device="cpu"))
    assert (result.coarse_pixel_m, result.refine_pixel_m) == pytest.approx((shipped.pixel_size_m, low))
