"""Latency of the dock: a drawn 1024 × 1024 px extent, from pressing Run to the styled layer in the project.

Drives the real IdgbrDock (headless QGIS, real backend service, the dock's own RefineTask and client
calls), so the numbers include everything a user waits for: the jobs, the polling, loading and styling
the layers. The first run starts the service (cold start: Python, torch, model load); the following runs
reuse it (warm). The input is the bundled sample mirrored to 2048 × 2048 px, so the extent is real
imagery on a real grid and the benchmark needs nothing outside the repository.

    .venv/bin/python tools/bench_dock.py [--runs 5] [--size 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "resources" / "sample" / "dubai_sample.tif"


def _mirrored_sample(target: Path, size: int = 2048) -> Path:
    """The 1000 px sample mirrored into a size × size GeoTIFF on the same 0.5 m grid (GDAL from QGIS)."""
    import numpy as np
    from osgeo import gdal

    src = gdal.Open(str(SAMPLE))
    pixels = src.ReadAsArray()  # (bands, rows, cols)
    reps = -(-size // pixels.shape[1])
    tiles = [pixels if i % 2 == 0 else pixels[:, ::-1, :] for i in range(reps)]
    column = np.concatenate(tiles, axis=1)
    row_tiles = [column if j % 2 == 0 else column[:, :, ::-1] for j in range(reps)]
    big = np.concatenate(row_tiles, axis=2)[:, :size, :size]
    driver = gdal.GetDriverByName("GTiff")
    out = driver.Create(str(target), size, size, big.shape[0], gdal.GDT_Byte, ["TILED=YES", "COMPRESS=DEFLATE"])
    out.SetGeoTransform(src.GetGeoTransform())
    out.SetProjection(src.GetProjection())
    for band in range(big.shape[0]):
        out.GetRasterBand(band + 1).WriteArray(big[band])
    out.FlushCache()
    out = None
    return target


def bench(runs: int, size: int, work: Path) -> Dict[str, Any]:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.environ["QGIS_CUSTOM_CONFIG_PATH"] = str(work / "profile")  # the user's settings stay untouched
    sys.path.insert(0, str(REPO))
    from unittest.mock import MagicMock

    from qgis.core import QgsApplication, QgsCoordinateReferenceSystem, QgsProject, QgsRasterLayer, QgsRectangle
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtWidgets import QApplication, QMainWindow

    app = QgsApplication([], True)
    app.initQgis()
    from idgbr_qgis.backend_process import BackendManager, development_python
    from idgbr_qgis.ui import config
    from idgbr_qgis.ui.dock import IdgbrDock

    config.UserSettings(device="auto", model="dubai5", output_dir=str(work / "results")).save()
    raster = _mirrored_sample(work / "bench_input.tif")
    layer = QgsRasterLayer(str(raster), "bench", "gdal")
    assert layer.isValid()
    QgsProject.instance().addMapLayer(layer)
    QgsProject.instance().setCrs(layer.crs())

    window = QMainWindow()
    canvas = QgsMapCanvas(window)
    canvas.setDestinationCrs(layer.crs())
    iface = MagicMock()
    iface.mainWindow.return_value = window
    iface.mapCanvas.return_value = canvas
    iface.messageBar.return_value = QgsMessageBar(window)
    python = development_python()
    manager = BackendManager(state_dir=work / "state", timeout=300.0, locate=lambda: (python, "bench"))
    dock = IdgbrDock(iface, manager)
    dock._health_requested = True  # the cold start is measured by the first run, not warmed on show
    dock.layerCombo.setLayer(layer)
    full = layer.extent()
    pixel = layer.rasterUnitsPerPixelX()
    # A size × size px extent in the middle, as drawn on the map (canvas CRS = layer CRS here).
    cx, cy = full.center().x(), full.center().y()
    half = size * pixel / 2
    dock.set_drawn_extent(QgsRectangle(cx - half, cy - half, cx + half, cy + half),
                          QgsCoordinateReferenceSystem(layer.crs()))

    times: List[float] = []
    details: List[Dict[str, Any]] = []
    try:
        for index in range(runs + 1):
            outcome: Dict[str, Any] = {}
            dock.runFinished.connect(lambda ok, msg, o=outcome: o.update(ok=ok, message=msg))
            started = time.perf_counter()
            task = dock.run()
            if task is None:
                raise SystemExit("the dock refused to run: " + dock.statusLabel.text())
            while not outcome:
                QApplication.processEvents()
                time.sleep(0.002)
            elapsed = time.perf_counter() - started
            dock.runFinished.disconnect()
            if not outcome["ok"]:
                raise SystemExit(f"run {index} failed: {outcome['message']}")
            refined = [lyr for lyr in QgsProject.instance().mapLayers().values()
                       if lyr.name().endswith("IDGBR refined")][-1]
            details.append({"seconds": round(elapsed, 3), "width": refined.width(), "height": refined.height()})
            times.append(elapsed)
        health = manager.client().health()
    finally:
        dock.shutdown()
        manager.shutdown()
    warm = times[1:]
    result = {
        "extent_px": f"{details[0]['width']} x {details[0]['height']}",
        "cold_s": round(times[0], 2),
        "warm_median_s": round(statistics.median(warm), 2) if warm else None,
        "warm_min_s": round(min(warm), 2) if warm else None,
        "warm_max_s": round(max(warm), 2) if warm else None,
        "warm_runs": len(warm),
        "steps": (config.read_model_card(config.bundled_models()["dubai5"]).get("sampler") or {}).get("steps"),
        "device": health.get("device"),
        "device_name": health.get("device_name"),
        "torch": health.get("torch"),
        "cpu_count": os.cpu_count(),
        "runs": details,
    }
    app.exitQgis()
    return result


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="warm runs after the cold one (default 5)")
    parser.add_argument("--size", type=int, default=1024, help="extent size in pixels (default 1024)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="idgbr_bench_dock_") as scratch:
        result = bench(args.runs, args.size, Path(scratch))
    print(f"Dock latency, drawn {result['extent_px']} px extent, dubai5 ({result['steps']} steps), "
          f"device {result['device']} {result['device_name'] or ''}, torch {result['torch']}, "
          f"{result['cpu_count']} CPUs")
    print(f"  cold (service start + model load + run): {result['cold_s']:.2f} s")
    if result["warm_runs"]:
        print(f"  warm: median {result['warm_median_s']:.2f} s, min {result['warm_min_s']:.2f} s, "
              f"max {result['warm_max_s']:.2f} s over {result['warm_runs']} runs")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2), encoding="utf-8")
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
