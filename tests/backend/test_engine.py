"""Engine behaviour with a stand-in model whose output is known, so tiling, blending, blocks, batches,
skipping, nodata and the written file can be checked exactly (the real model is used in test_engine_model)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from idgbr import pipeline
from idgbr.errors import Cancelled, IdgbrError
from idgbr.models.diffusion import apply_guard_band, position_noise
from idgbr.pipeline import RunOptions, run
from idgbr.raster.windows import TileGrid, axis_layout, column_blocks, ramp_weights

CLASSES = [{"id": 0, "name": "dark", "color": "#000080"}, {"id": 1, "name": "mid", "color": "#00FF00"},
           {"id": 2, "name": "bright", "color": "#FFFF00"}]


class FakeBundle:
    """Per-pixel stand-in model: the coarse class is the pixel's brightness bucket; near coarse boundaries
    (the guard band) the refiner adds position-seeded noise like the real sampler, so tile placement errors
    would show."""

    def __init__(self, multiple: int = 8) -> None:
        self.card = {"name": "fake", "num_classes": 3, "classes": CLASSES, "bands": ["red", "green", "blue"],
                     "bands_default": [1, 2, 3], "normalization": {"mean": [100.0] * 3, "std": [50.0] * 3},
                     "tile_size": 64, "overlap": 16, "size_multiple": multiple, "pixel_size_m": 0.5,
                     "sampler": {"steps": 2, "guard_band": 4, "seed": 0, "strength": 1.0}}
        self.device = torch.device("cpu")
        self.coarse = self.refiner = object()
        self.segment_tiles = 0
        self.refine_tiles = 0

    def normalize(self, pixels):
        tensor = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
        return (tensor - 100.0) / 50.0

    def segment(self, images):
        assert images.shape[-1] % self.card["size_multiple"] == 0
        self.segment_tiles += images.shape[0]
        brightness = images.mean(dim=1, keepdim=True)
        centres = torch.tensor([-1.0, 0.0, 1.0])[None, :, None, None]
        return -((brightness - centres) ** 2) * 10

    def refine(self, images, coarse_ids, origins, steps=None, seed=0, guard_band=None):
        self.refine_tiles += images.shape[0]
        batch, _, height, width = images.shape
        noise = torch.stack([position_noise(seed, o, (3, height, width)) for o in origins])
        one_hot = torch.nn.functional.one_hot(coarse_ids, 3).permute(0, 3, 1, 2).float()
        return apply_guard_band(one_hot * 2.0 + noise, coarse_ids, guard_band or 0)


@pytest.fixture
def fake(monkeypatch):
    bundle = FakeBundle()
    monkeypatch.setattr(pipeline, "load_bundle", lambda model=None, device="auto": bundle)
    return bundle


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_axis_layout_covers_every_pixel_with_equal_tiles_and_enough_overlap():
    for length in (1, 5, 64, 65, 100, 448, 1000, 4096):
        size, offsets = axis_layout(length, 64, 16, multiple=8)
        assert size <= 64 and (size % 8 == 0 or size == length)
        covered = np.zeros(length, bool)
        for o in offsets:
            assert o >= 0 and o + size <= length
            covered[o:o + size] = True
        assert covered.all() and offsets == sorted(set(offsets))
        assert all(a + size - b >= 16 for a, b in zip(offsets, offsets[1:]))
    assert axis_layout(1000, 512, 64, 8) == (376, [0, 312, 624])


def test_ramp_weights_positive_and_fade_only_towards_neighbours():
    grid = TileGrid(200, 200, 64, 16)
    for x in grid.cols:
        w = grid.col_weights(x)
        assert (w > 0).all() and w.max() == pytest.approx(1.0)
    first, last = grid.cols[0], grid.cols[-1]
    assert grid.col_weights(first)[0] == 1.0 and grid.col_weights(first)[-1] < 0.05
    assert grid.col_weights(last)[-1] == 1.0 and grid.col_weights(last)[0] < 0.05
    assert (ramp_weights(0, 64, 64, 16) == 1).all()  # a lone tile is not faded


def test_column_blocks_cover_output_once_and_include_needed_tiles():
    grid = TileGrid(100, 1000, 64, 16)
    blocks = column_blocks(grid, 256, with_refine=True)
    assert [(b.out_start, b.out_stop) for b in blocks] == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    for b in blocks:
        for x in grid.cols:
            if x < b.out_stop and x + 64 > b.out_start:
                assert x in b.refine_cols
        assert set(b.refine_cols) <= set(b.coarse_cols)


@pytest.mark.parametrize("mode", ["segment", "refine"])
def test_tiling_blocks_and_batches_do_not_change_the_result(fake, crop_raster, tmp_path, monkeypatch, mode):
    src = crop_raster(300, 150, col=100, row=200)
    whole = tmp_path / "whole.tif"
    run(RunOptions(input=src, output=whole, mode=mode, tile=512, guard_band=0))  # one tile, no blending
    assert fake.segment_tiles == 1
    tiled = tmp_path / "tiled.tif"
    monkeypatch.setattr(pipeline, "default_batch", lambda device: 3)
    monkeypatch.setattr(pipeline, "BLOCK_WIDTH", 256)
    result = run(RunOptions(input=src, output=tiled, mode=mode, tile=48, overlap=12, guard_band=0))
    assert result.tiles > 10
    np.testing.assert_array_equal(read(whole), read(tiled))


def test_skips_refiner_on_tiles_without_a_class_boundary(fake, raster_writer, tmp_path):
    data = np.full((3, 100, 100), 30, np.uint8)
    data[:, :, 70:] = 200  # one vertical boundary at column 70
    from rasterio.transform import from_origin
    src = raster_writer("halves.tif", data, crs="EPSG:32640", transform=from_origin(0, 100, 1, 1))
    result = run(RunOptions(input=src, output=tmp_path / "out.tif", tile=32, overlap=8))
    assert 0 < result.tiles_refined < result.tiles
    assert fake.refine_tiles == result.tiles_refined
    out = read(tmp_path / "out.tif")
    assert (out[:, :60] == 0).all() and (out[:, 80:] == 2).all()


def test_output_is_styled_uint8_on_the_input_grid(fake, crop_raster, tmp_path, sample_raster):
    src = crop_raster(300, 280, col=10, row=20)
    out = tmp_path / "out.tif"
    run(RunOptions(input=src, output=out, mode="segment"))
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert b.dtypes == ("uint8",) and b.count == 1 and b.nodata == 255
        assert b.crs == a.crs and b.transform == a.transform and b.shape == a.shape
        assert b.profile["tiled"] and b.compression.name.lower() == "deflate"
        cmap = b.colormap(1)
        assert cmap[1][:3] == (0, 255, 0) and cmap[255][3] == 0
        assert b.tags(1)["CLASS_2"] == "bright"
        assert set(np.unique(b.read(1))) <= {0, 1, 2}
    assert "<Category>mid</Category>" in Path(str(out) + ".aux.xml").read_text()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_nodata_and_internal_mask_become_255(fake, crop_raster, raster_writer, tmp_path):
    with rasterio.open(crop_raster(80, 60)) as s:
        data, crs, transform = s.read(), s.crs, s.transform
    data[:, :10, :] = 0
    src = raster_writer("nodata.tif", data, crs=crs, transform=transform, nodata=0)
    run(RunOptions(input=src, output=tmp_path / "a.tif", tile=32, overlap=8))
    out = read(tmp_path / "a.tif")
    assert (out[:10] == 255).all() and (out[10:] != 255).all()

    masked = tmp_path / "masked.tif"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
            masked, "w", driver="GTiff", width=80, height=60, count=3, dtype="uint8", crs=crs,
            transform=transform) as dst:
        dst.write(data)
        mask = np.full((60, 80), 255, np.uint8)
        mask[:, 50:] = 0
        dst.write_mask(mask)
    run(RunOptions(input=masked, output=tmp_path / "b.tif", mode="segment"))
    out = read(tmp_path / "b.tif")
    assert (out[:, 50:] == 255).all() and (out[20:, :50] != 255).all()


def test_float_input_with_nan_and_no_nodata(fake, crop_raster, raster_writer, tmp_path):
    with rasterio.open(crop_raster(48, 40)) as s:
        data, crs, transform = s.read().astype(np.float32) / 255.0, s.crs, s.transform
    data[1, :5, :] = np.nan
    src = raster_writer("float.tif", data, crs=crs, transform=transform)
    run(RunOptions(input=src, output=tmp_path / "o.tif", mode="segment"))
    out = read(tmp_path / "o.tif")
    assert (out[:5] == 255).all() and (out[5:] < 3).all()


def test_extent_is_snapped_outward_to_the_grid(fake, crop_raster, tmp_path):
    src = crop_raster(200, 200)
    with rasterio.open(src) as s:
        left, top = s.transform.c, s.transform.f  # 0.5 m pixels
    out = tmp_path / "ext.tif"
    run(RunOptions(input=src, output=out, mode="segment", extent=(left + 10.2, top - 30.3, left + 40.7, top - 5.1)))
    with rasterio.open(out) as b:
        assert b.transform.c == left + 10.0 and b.transform.f == top - 5.0
        assert b.width == 62 and b.height == 51  # cols 20..82, rows 10..61


def test_extent_in_another_crs(fake, crop_raster, tmp_path):
    from rasterio.warp import transform_bounds
    src = crop_raster(200, 200)
    with rasterio.open(src) as s:
        lonlat = transform_bounds(s.crs, "EPSG:4326", s.bounds.left + 20, s.bounds.bottom + 20,
                                  s.bounds.left + 60, s.bounds.bottom + 50)
    out = tmp_path / "ext.tif"
    run(RunOptions(input=src, output=out, mode="segment", extent=lonlat, extent_crs="EPSG:4326"))
    with rasterio.open(out) as b:
        assert 80 <= b.width <= 84 and 60 <= b.height <= 64


def test_cancel_leaves_no_output(fake, crop_raster, tmp_path):
    src = crop_raster(200, 200)
    cancel = threading.Event()
    out = tmp_path / "out.tif"
    calls = []

    def progress(fraction, message):
        calls.append(fraction)
        if len(calls) == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        run(RunOptions(input=src, output=out, tile=32, overlap=8), progress=progress, cancel=cancel)
    assert list(tmp_path.glob("out.tif*")) == [] and list(tmp_path.glob(".out.tif*")) == []
    assert fake.refine_tiles + fake.segment_tiles < 60  # stopped early


def test_progress_reports_fraction_and_rate(fake, crop_raster, tmp_path):
    seen = []
    run(RunOptions(input=crop_raster(100, 100), output=tmp_path / "o.tif", tile=32, overlap=8),
        progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    assert "tiles" in seen[-1][1] and "MP/s" in seen[-1][1] and "ETA" in seen[-1][1]


def test_external_coarse_map_same_and_other_grid(fake, crop_raster, raster_writer, tmp_path):
    src = crop_raster(128, 96)
    with rasterio.open(src) as s:
        crs, transform = s.crs, s.transform
    ids = np.zeros((96, 128), np.uint8)
    ids[:, 64:] = 1
    same = raster_writer("coarse.tif", ids, crs=crs, transform=transform)
    run(RunOptions(input=src, output=tmp_path / "a.tif", coarse=same, tile=64, overlap=16))
    assert fake.segment_tiles == 0
    out = read(tmp_path / "a.tif")
    assert (out[:, :50] == 0).all() and (out[:, 80:] == 1).all()  # the coarse map, refined near its edge only

    # Twice the pixel size, covering only the left 3/4 of the input: resampled nearest, outside -> nodata.
    half = ids[::2, ::2][:, :48].copy()
    other = raster_writer("coarse2.tif", half, crs=crs, transform=transform * transform.scale(2, 2), nodata=255)
    run(RunOptions(input=src, output=tmp_path / "b.tif", coarse=other, tile=64, overlap=16))
    out = read(tmp_path / "b.tif")
    assert (out[:, 96:] == 255).all() and (out[:, :50] == 0).all() and (out[:, 70:90] == 1).all()


def test_external_coarse_with_foreign_ids_is_rejected(fake, crop_raster, raster_writer, tmp_path):
    src = crop_raster(64, 64)
    with rasterio.open(src) as s:
        crs, transform = s.crs, s.transform
    ids = np.zeros((64, 64), np.uint8)
    ids[0, :3] = [7, 9, 255]  # 255 is its nodata, not a class
    bad = raster_writer("bad.tif", ids, crs=crs, transform=transform, nodata=255)
    with pytest.raises(IdgbrError, match=r"class ids 7, 9, outside this model's classes 0\.\.2"):
        run(RunOptions(input=src, output=tmp_path / "o.tif", coarse=bad))
    assert not (tmp_path / "o.tif").exists()


def test_one_pixel_raster(fake, crop_raster, tmp_path):
    out = tmp_path / "o.tif"
    result = run(RunOptions(input=crop_raster(1, 1), output=out))
    assert read(out).shape == (1, 1) and result.tiles == 1
