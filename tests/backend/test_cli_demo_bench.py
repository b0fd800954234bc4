"""`make demo` (python -m idgbr.demo) and the pieces of `idgbr bench`, at a size that suits a test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from idgbr import bench, demo


def test_demo_writes_refined_geotiff_and_preview(bundled_model, crop_raster, tmp_path):
    src = crop_raster(96, 64, col=300, row=300)
    out = tmp_path / "out"
    assert demo.main(["--out", str(out), "--input", str(src), "--steps", "1", "-q"]) == 0
    with rasterio.open(out / "demo_refined.tif") as dst, rasterio.open(src) as s:
        assert dst.crs == s.crs and dst.transform == s.transform and dst.dtypes == ("uint8",)
        assert dst.colormap(1)[0][3] == 255 and dst.tags()["IDGBR_MODE"] == "refine"
    with Image.open(out / "demo_preview.png") as preview:
        assert preview.width > 3 * preview.height / 2  # three panels side by side, legend below
    assert not list(out.glob(".*"))


def test_preview_shows_three_panels_and_a_legend():
    classes = [{"id": 0, "name": "water", "color": "#0000FF"}, {"id": 1, "name": "road", "color": "#FF0000"}]
    image = np.full((40, 60, 3), 200, np.uint8)
    coarse = np.zeros((40, 60), np.uint8)
    refined = np.ones((40, 60), np.uint8)
    refined[0, 0] = 255
    picture = np.asarray(demo.render_preview(image, coarse, refined, classes, panel=120))
    assert (picture == (0, 0, 255)).all(-1).sum() > 40 * 60  # coarse panel in the water colour
    assert (picture == (255, 0, 0)).all(-1).sum() > 40 * 60  # refined panel in the road colour
    assert (picture == demo.NODATA_RGB).all(-1).any()  # nodata shown, not painted as a class


@pytest.fixture
def tiny_dataset(tmp_path, sample_raster) -> Path:
    """Two 'tiles' of JPEGs cut from the sample raster, laid out like the shared Dubai dataset."""
    with rasterio.open(sample_raster) as src:
        pixels = np.moveaxis(src.read(), 0, -1)
    for n, (row, col) in enumerate([(0, 0), (400, 300)]):
        folder = tmp_path / "dubai" / f"tile{n + 1}" / "images"
        folder.mkdir(parents=True)
        Image.fromarray(pixels[row:row + 600, col:col + 600]).save(folder / "image_part_001.jpg", quality=95)
    return tmp_path / "dubai"


def test_bench_builds_rasters_measures_and_reports(bundled_model, tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CELL", 256)
    mosaic = bench.build_mosaic(tiny_dataset, tmp_path / "mosaic.tif", 512)
    large = bench.build_large(mosaic, tmp_path / "large.tif", 1200, rows_per_write=500)
    with rasterio.open(mosaic) as m, rasterio.open(large) as big:
        assert m.shape == (512, 512) and big.shape == (1200, 1200)
        np.testing.assert_array_equal(big.read(window=((512, 1024), (0, 512))), m.read())  # tiled copies
        assert m.read().std() > 10  # real imagery, not a blank canvas
    row = bench.child_main({"input": str(mosaic), "output": str(tmp_path / "o.tif"), "mode": "refine",
                            "steps": 1, "extent": None})
    assert row["width"] == 512 and row["tiles"] >= 1 and not (tmp_path / "o.tif").exists()
    assert row["peak_rss"] is None or row["peak_rss"] > 50e6
    seg, full, card = bench.model_flops(None, 1)
    assert 0 < seg < full
    report = bench.render_report([{**row, "label": "mosaic", "mode": "refine"}], bench.machine_summary("cpu"), card,
                                 (seg, full), {"steps": 1, "device": "cpu", "mosaic_size": 512,
                                               "large_size": 1200, "large_rows": 128})
    assert "| mosaic | 512 x 512" in report and "GFLOPs per megapixel" in report and "peak RSS" in report
    path = tmp_path / "docs" / "BENCH.md"
    bench.write_report(path, report)
    assert path.read_text() == report


def test_bench_reference_segments_the_whole_raster_on_its_grid(tiny_dataset, tmp_path, monkeypatch):
    """The plain ResNet-34 U-Net the bench compares against covers every pixel once, on the input's grid."""
    from idgbr.bench_reference import run_reference

    monkeypatch.setattr(bench, "CELL", 256)
    mosaic = bench.build_mosaic(tiny_dataset, tmp_path / "mosaic.tif", 512)
    result = run_reference(mosaic, tmp_path / "plain.tif", tile=224, overlap=32, classes=5, precision="fp32")
    assert (result["width"], result["height"], result["precision"]) == (512, 512, "fp32") and result["tiles"] == 9
    with rasterio.open(tmp_path / "plain.tif") as out, rasterio.open(mosaic) as src:
        classes = out.read(1)
        assert out.transform == src.transform and out.crs == src.crs
    assert (classes != 255).all() and classes.max() < 5  # no pixel left unwritten (255 is its nodata)


def test_bench_compares_precisions_pixel_by_pixel_and_reports_the_speed_bar(tmp_path):
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "dtype": "uint8"}
    a = np.zeros((64, 64), np.uint8)
    b = a.copy()
    b[:32, :32] = 1  # a quarter differs
    for name, values in (("a.tif", a), ("b.tif", b)):
        with rasterio.open(tmp_path / name, "w", **profile) as dst:
            dst.write(values, 1)
    assert bench.pixel_agreement(tmp_path / "a.tif", tmp_path / "b.tif") == pytest.approx(0.75)

    def row(mode, precision, seconds):
        return {"label": bench.PLAIN_LABEL if mode == bench.PLAIN_MODE else "mosaic", "mode": mode,
                "precision": precision, "seconds": seconds, "width": 4000, "height": 4000}

    rows = [row(bench.PLAIN_MODE, "fp32", 20.0), row("refine", "fp32", 12.0), row(bench.PLAIN_MODE, "bf16", 10.0),
            row("refine", "bf16", 4.0)]
    text = "\n".join(bench.speed_bar(rows, {"bf16": 0.999}))
    assert "at fp32: segment + refine takes **0.60×** the plain ResNet-34 U-Net's time (target <= 0.5: NOT met)" in text
    assert "at bf16: segment + refine takes **0.40×**" in text and "0.25 s/MP (target <= 0.5: met)" in text
    assert "bf16 against fp32 (segment + refine on the mosaic): **3.00× faster** (target >= 1.8×: met)" in text
    assert "**99.90 %** of pixels agree (target >= 99.5 %: met)" in text
