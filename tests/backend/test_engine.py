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
from idgbr.card import ClassEntry, ModelCard, Normalization, Sampler
from idgbr.errors import Cancelled, IdgbrError
from idgbr.models.constraints import allowed_classes, constrain_logits
from idgbr.models.diffusion import position_noise
from idgbr.pipeline import RunOptions, run
from idgbr.precision import cpu_has_bf16
from idgbr.raster.windows import TileGrid, axis_layout, column_blocks, ramp_weights

CLASSES = [{"id": 0, "name": "dark", "color": "#000080"}, {"id": 1, "name": "mid", "color": "#00FF00"},
           {"id": 2, "name": "bright", "color": "#FFFF00"}]


class FakeBundle:
    """Per-pixel stand-in model: the coarse class is the pixel's brightness bucket; the refiner adds
    position-seeded noise like the real sampler (so tile placement errors would show), under the band and
    vocabulary rules like the real sampler."""

    def __init__(self, multiple: int = 8) -> None:
        self.card = ModelCard(name="fake", num_classes=3, classes=[ClassEntry(**c) for c in CLASSES],
                              bands=["red", "green", "blue"], bands_default=[1, 2, 3],
                              normalization=Normalization([100.0] * 3, [50.0] * 3), architecture={},
                              tile_size=64, overlap=16, size_multiple=multiple, pixel_size_m=0.5,
                              sampler=Sampler(steps=2, band=4, vocabulary=4))
        self.device = torch.device("cpu")
        self.coarse = self.refiner = object()
        self.segment_tiles = 0
        self.refine_tiles = 0
        self.refine_calls: list[dict] = []

    def normalize(self, pixels):
        tensor = torch.as_tensor(np.asarray(pixels), dtype=torch.float32)
        return (tensor - 100.0) / 50.0

    def segment(self, images, precision=None):
        assert images.shape[-1] % self.card.size_multiple == 0
        self.segment_tiles += images.shape[0]
        brightness = images.mean(dim=1, keepdim=True)
        centres = torch.tensor([-1.0, 0.0, 1.0])[None, :, None, None]
        return -((brightness - centres) ** 2) * 10

    def refine(self, images, coarse_ids, origins, steps=None, seed=0, band=None, vocabulary=None, precision=None):
        self.refine_tiles += images.shape[0]
        self.refine_calls.append({"band": band, "vocabulary": vocabulary, "precision": precision})
        batch, _, height, width = images.shape
        noise = torch.stack([position_noise(seed, o, (3, height, width)) for o in origins])
        one_hot = torch.nn.functional.one_hot(coarse_ids, 3).permute(0, 3, 1, 2).float()
        return constrain_logits(one_hot * 2.0 + noise, allowed_classes(coarse_ids, 3, band, vocabulary))


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
    run(RunOptions(input=src, output=whole, mode=mode, tile=512, band=0))  # one tile, no blending
    assert fake.segment_tiles == 1
    tiled = tmp_path / "tiled.tif"
    monkeypatch.setattr(pipeline, "default_batch", lambda device: 3)
    monkeypatch.setattr(pipeline, "BLOCK_WIDTH", 256)
    result = run(RunOptions(input=src, output=tiled, mode=mode, tile=48, overlap=12, band=0))
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


# ------------------------------------------------------------------------------------------------------------
# The refiner's rules and the confidence output
# ------------------------------------------------------------------------------------------------------------
def _halves(raster_writer, width: int = 120, height: int = 90):
    """An image with one vertical class boundary at column 70, and its coarse map with the boundary at 60
    (so the refiner has something to change), on one georeferenced grid."""
    from rasterio.transform import from_origin

    data = np.full((3, height, width), 30, np.uint8)
    data[:, :, 70:] = 200
    transform = from_origin(500000, 2800000, 0.5, 0.5)
    src = raster_writer("halves.tif", data, crs="EPSG:32640", transform=transform)
    ids = np.zeros((height, width), np.uint8)
    ids[:, 60:] = 2
    coarse = raster_writer("halves_coarse.tif", ids, crs="EPSG:32640", transform=transform)
    return src, coarse, ids


def test_rules_default_from_the_card_and_reach_the_refiner(fake, raster_writer, tmp_path):
    src, coarse, _ = _halves(raster_writer)
    out = tmp_path / "o.tif"
    result = run(RunOptions(input=src, output=out, coarse=coarse, tile=64, overlap=16))
    assert {(c["band"], c["vocabulary"]) for c in fake.refine_calls} == {(4, 4)}
    assert (result.band, result.vocabulary, result.min_confidence) == (4, 4, 0.0)
    with rasterio.open(out) as dst:
        tags = dst.tags()
    assert (tags["IDGBR_BAND"], tags["IDGBR_VOCABULARY"], tags["IDGBR_MIN_CONFIDENCE"]) == ("4", "4", "0")

    fake.refine_calls.clear()
    result = run(RunOptions(input=src, output=tmp_path / "p.tif", coarse=coarse, tile=64, overlap=16, band=-1,
                            vocabulary=12, min_confidence=0.25))
    assert {(c["band"], c["vocabulary"]) for c in fake.refine_calls} == {(-1, 12)}
    assert (result.band, result.vocabulary, result.min_confidence) == (-1, 12, 0.25)


@pytest.mark.parametrize("rule", [{"band": 0}, {"min_confidence": 1.0}])
def test_band_0_and_min_confidence_1_return_the_coarse_map_exactly(fake, raster_writer, tmp_path, rule):
    src, coarse, ids = _halves(raster_writer)
    free = run(RunOptions(input=src, output=tmp_path / "free.tif", coarse=coarse, tile=64, overlap=16, band=-1,
                          vocabulary=-1))
    assert free.changed_pixels > 0 and not np.array_equal(read(tmp_path / "free.tif"), ids), "nothing to keep"
    out = tmp_path / "kept.tif"
    rules = {"band": -1, "vocabulary": -1, **rule}
    result = run(RunOptions(input=src, output=out, coarse=coarse, tile=64, overlap=16, **rules))
    np.testing.assert_array_equal(read(out), ids)
    assert result.changed_pixels == 0


def test_the_confidence_gate_keeps_the_coarse_class_where_the_refiner_is_unsure(fake, raster_writer, tmp_path):
    src, coarse, ids = _halves(raster_writer)
    common = dict(input=src, coarse=coarse, tile=64, overlap=16, band=-1, vocabulary=-1)
    run(RunOptions(output=tmp_path / "free.tif", confidence=tmp_path / "free_conf.tif", **common))
    run(RunOptions(output=tmp_path / "gated.tif", min_confidence=0.6, **common))
    # A gate of 1 keeps every coarse class, so its confidence output is the refiner's probability of it.
    run(RunOptions(output=tmp_path / "kept.tif", confidence=tmp_path / "coarse_conf.tif", min_confidence=1.0,
                   **common))
    free, gated = read(tmp_path / "free.tif"), read(tmp_path / "gated.tif")
    np.testing.assert_array_equal(read(tmp_path / "kept.tif"), ids)
    new_prob, coarse_prob = read(tmp_path / "free_conf.tif"), read(tmp_path / "coarse_conf.tif")
    changed = free != ids
    # The gate weighs the new class against the coarse class only.
    sure = new_prob / (new_prob + coarse_prob) >= 0.6
    np.testing.assert_array_equal(gated[changed & sure], free[changed & sure])
    np.testing.assert_array_equal(gated[changed & ~sure], ids[changed & ~sure])
    assert (changed & sure).any() and (changed & ~sure).any(), "the fake refiner should give both cases"
    np.testing.assert_array_equal(gated[~changed], ids[~changed])


def test_confidence_output_is_float32_on_the_input_grid(fake, crop_raster, raster_writer, tmp_path):
    with rasterio.open(crop_raster(150, 110, col=300, row=300)) as s:
        data, crs, transform = s.read(), s.crs, s.transform
    data[:, :7, :] = 0  # nodata rows
    src = raster_writer("in.tif", data, crs=crs, transform=transform, nodata=0)
    out, conf = tmp_path / "out.tif", tmp_path / "conf.tif"
    result = run(RunOptions(input=src, output=out, confidence=conf, tile=48, overlap=12))
    assert result.confidence == conf and result.to_dict()["confidence"] == str(conf)
    with rasterio.open(src) as a, rasterio.open(out) as b, rasterio.open(conf) as c:
        assert c.dtypes == ("float32",) and c.count == 1
        assert c.crs == a.crs and c.transform == a.transform and c.shape == a.shape
        assert c.descriptions == ("refiner confidence",) and c.nodata == -1
        assert c.tags()["IDGBR_MODE"] == "refine"
        values, ids = c.read(1), b.read(1)
    valid = ids != 255
    assert (values[~valid] == -1).all() and not valid[:7].any()
    assert ((values[valid] >= 0) & (values[valid] <= 1)).all()
    assert (values[valid] < 1).any() and (values[valid] == 1).any()  # refined pixels and boundary-free tiles
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("options, message", [
    ({"mode": "segment", "confidence": "c.tif"}, r"segment mode has none.*--confidence"),
    ({"confidence": "o.tif"}, r"--confidence and OUTPUT are the same file"),
    ({"confidence": "in.tif"}, r"confidence output \(--confidence\) is the same file as INPUT"),
    ({"band": 2000}, r"band must be a whole number from -1 to 1024.*--band"),
    ({"vocabulary": -3}, r"vocabulary must be a whole number from -1 to 1024.*--vocabulary"),
    ({"min_confidence": 1.5}, r"min confidence must be a number from 0 to 1.*--min-confidence"),
])
def test_bad_rule_and_confidence_options_fail_before_writing(fake, crop_raster, tmp_path, options, message):
    src = crop_raster(32, 32, name="in.tif")
    options = {k: (tmp_path / v if k == "confidence" else v) for k, v in options.items()}
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(IdgbrError, match=message):
        run(RunOptions(input=src, output=tmp_path / "o.tif", **options))
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert fake.segment_tiles == fake.refine_tiles == 0


def test_failed_run_leaves_neither_output(fake, crop_raster, tmp_path, monkeypatch):
    src = crop_raster(100, 100)

    def broken(*args, **kwargs):
        raise RuntimeError("the model broke")

    monkeypatch.setattr(fake, "refine", broken)
    with pytest.raises(RuntimeError):
        run(RunOptions(input=src, output=tmp_path / "o.tif", confidence=tmp_path / "c.tif", tile=32, overlap=8))
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]


# ------------------------------------------------------------------------------------------------------------
# Reads and writes on the I/O thread; the networks' precision
# ------------------------------------------------------------------------------------------------------------
def io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "idgbr-io"]


def _both_ways(monkeypatch, tmp_path: Path, **options) -> list[tuple[np.ndarray, dict]]:
    """Run ``options`` with reads and writes on the I/O thread and in the engine's own thread; each output's
    pixels and tags, synchronous run first."""
    results = []
    for threaded in (False, True):
        monkeypatch.setattr(pipeline, "IO_THREAD", threaded)
        folder = tmp_path / ("threaded" if threaded else "synchronous")
        folder.mkdir()
        conf = folder / "conf.tif" if options.get("mode", "refine") == "refine" else None
        run(RunOptions(output=folder / "out.tif", confidence=conf, **options))
        for path in (folder / "out.tif", conf):
            if path is not None:
                with rasterio.open(path) as dst:
                    results.append((dst.read(1), dst.tags()))
    assert not io_threads()
    return results


@pytest.mark.parametrize("case", ["segment", "refine", "coarse map on another grid", "resampled passes"])
def test_the_io_thread_writes_exactly_what_a_synchronous_run_writes(fake, crop_raster, raster_writer, tmp_path,
                                                                    monkeypatch, case):
    monkeypatch.setattr(pipeline, "default_batch", lambda device: 3)
    monkeypatch.setattr(pipeline, "BLOCK_WIDTH", 128)  # several column blocks
    with rasterio.open(crop_raster(300, 170, col=250, row=300)) as s:
        data, crs, transform = s.read(), s.crs, s.transform
    data[:, :9, :] = 0  # nodata rows
    src = raster_writer("in.tif", data, crs=crs, transform=transform, nodata=0)
    options = {"input": src, "tile": 48, "overlap": 12}
    if case == "segment":
        options["mode"] = "segment"
    elif case == "coarse map on another grid":
        ids = np.zeros((85, 150), np.uint8)
        ids[:, 60:] = 2
        ids[40:, 100:] = 1
        options["coarse"] = raster_writer("coarse.tif", ids, crs=crs, transform=transform * transform.scale(2, 2))
    elif case == "resampled passes":
        options.update(pixel_size=0.05, tile=32, overlap=8)  # coarse and refine passes on two virtual grids
    results = _both_ways(monkeypatch, tmp_path, **options)
    half = len(results) // 2
    for (synchronous, sync_tags), (threaded, thread_tags) in zip(results[:half], results[half:]):
        np.testing.assert_array_equal(threaded, synchronous)
        assert thread_tags == sync_tags
    assert (results[0][0] == 255).any() and (results[0][0] != 255).any()


@pytest.mark.parametrize("where", ["read", "write"])
def test_an_error_on_the_io_thread_reaches_the_caller_and_leaves_nothing(fake, crop_raster, tmp_path, monkeypatch,
                                                                          where):
    from idgbr.raster import engine, io

    src = crop_raster(200, 200)
    threads = []
    real = engine.read_pixels if where == "read" else io.GeoTiffWriter.write

    def failing(*args):
        threads.append(threading.current_thread().name)
        if len(threads) == 2:
            raise IdgbrError(f"the {where} failed")
        return real(*args)

    if where == "read":
        monkeypatch.setattr(engine, "read_pixels", failing)
    else:
        monkeypatch.setattr(io.GeoTiffWriter, "write", failing)
    with pytest.raises(IdgbrError, match=f"the {where} failed"):
        run(RunOptions(input=src, output=tmp_path / "o.tif", confidence=tmp_path / "c.tif", tile=32, overlap=8))
    assert set(threads) == {"idgbr-io"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
    assert not io_threads()


def test_cancel_stops_the_io_thread_too(fake, crop_raster, tmp_path):
    cancel = threading.Event()
    seen = []

    def progress(fraction, message):
        seen.append(len(io_threads()))
        if len(seen) == 3:
            cancel.set()

    with pytest.raises(Cancelled):
        run(RunOptions(input=crop_raster(200, 200), output=tmp_path / "out.tif", tile=32, overlap=8),
            progress=progress, cancel=cancel)
    assert seen[-1] == 1  # the run had its I/O thread going ...
    assert not io_threads()  # ... and stopped it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("out", ".out"))] == []


def test_precision_reaches_the_networks_the_tags_and_the_notes(fake, raster_writer, tmp_path):
    src, coarse, _ = _halves(raster_writer)
    out = tmp_path / "o.tif"
    result = run(RunOptions(input=src, output=out, coarse=coarse, tile=64, overlap=16, precision="bf16"))
    assert result.precision == "bf16" and {c["precision"] for c in fake.refine_calls} == {"bf16"}
    assert any(note.startswith("Precision: bf16 for the networks") for note in result.notes)
    with rasterio.open(out) as dst:
        assert dst.tags()["IDGBR_PRECISION"] == "bf16"
    default = run(RunOptions(input=src, output=tmp_path / "d.tif", coarse=coarse, tile=64, overlap=16))
    assert default.precision == ("bf16" if cpu_has_bf16() else "fp32")  # the default is auto


@pytest.mark.parametrize("precision, message", [
    ("fp16", r"fp16 runs only on a CUDA GPU, and this run is on the CPU\. Use --precision bf16"),
    ("fast", r"Unknown precision 'fast': use auto, fp32, bf16 or fp16"),
])
def test_unusable_precisions_fail_before_writing(fake, crop_raster, tmp_path, precision, message):
    src = crop_raster(32, 32, name="in.tif")
    with pytest.raises(IdgbrError, match=message) as failure:
        run(RunOptions(input=src, output=tmp_path / "o.tif", precision=precision))
    assert failure.value.parameter == "precision"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
    assert fake.segment_tiles == fake.refine_tiles == 0


def test_larger_tiles_get_narrower_column_blocks_with_the_same_result(fake, crop_raster, tmp_path, monkeypatch):
    """Blend memory is a few tile rows times a block's width: doubling the tile halves the block, and the map
    is the same whichever way the raster is cut."""
    assert pipeline.block_width(256) == pipeline.block_width(512) == pipeline.BLOCK_WIDTH
    assert pipeline.block_width(1024) * 1024 == pipeline.BLOCK_WIDTH * 512
    src = crop_raster(260, 120)
    maps = []
    for width in (512, 128):  # one block, then two (blocks are at least one 256 px output block wide)
        monkeypatch.setattr(pipeline, "BLOCK_WIDTH", width)
        out = tmp_path / f"out{width}.tif"
        run(RunOptions(input=src, output=out, tile=96, overlap=16))
        with rasterio.open(out) as dst:
            maps.append(dst.read(1))
    np.testing.assert_array_equal(maps[0], maps[1])
