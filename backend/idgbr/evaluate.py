"""`idgbr evaluate`: score a class map against the truth (and against the coarse map it refined)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .classes import DUBAI_CLASSES, IGNORE_ID, ROAD_CLASSES
from .errors import IdgbrError
from .metrics import score


def read_ids(path: Path) -> tuple[np.ndarray, tuple]:
    """First band as uint8 ids (nodata -> IGNORE_ID) and the grid (shape, transform) for comparison."""
    import rasterio
    from rasterio.errors import RasterioIOError

    if not Path(path).is_file():
        raise IdgbrError(f"File not found: {path}")
    try:
        with rasterio.open(path) as src:
            band = src.read(1, masked=True)
            grid = (src.shape, tuple(src.transform)[:6])
    except RasterioIOError as exc:
        raise IdgbrError(f"{path} is not a raster GDAL can read ({exc}).") from exc
    values = np.asarray(band.filled(IGNORE_ID))
    if values.min() < 0 or values.max() > 255 or not np.all(np.mod(values, 1) == 0):
        raise IdgbrError(f"{path} does not hold class ids (integers 0..254, 255 = nodata).")
    return values.astype(np.uint8), grid


def _class_names(num_classes: int) -> list[str]:
    for table in (DUBAI_CLASSES, ROAD_CLASSES):
        if len(table) == num_classes:
            return [c.name for c in table]
    return [str(i) for i in range(num_classes)]


def evaluate_files(pred: Path, truth: Path, coarse: Path | None = None, num_classes: int | None = None) -> dict:
    pred_ids, pred_grid = read_ids(pred)
    truth_ids, truth_grid = read_ids(truth)
    if pred_grid[0] != truth_grid[0]:
        raise IdgbrError(f"{pred} is {pred_grid[0][1]}x{pred_grid[0][0]} px but {truth} is "
                         f"{truth_grid[0][1]}x{truth_grid[0][0]} px: score maps of the same grid.")
    if pred_grid[1] != truth_grid[1]:
        print("warning: prediction and truth have different geotransforms; comparing pixel by pixel")
    coarse_ids = None
    if coarse is not None:
        coarse_ids, coarse_grid = read_ids(coarse)
        if coarse_grid[0] != truth_grid[0]:
            raise IdgbrError(f"The coarse map {coarse} has another size than the truth {truth}.")
    if num_classes is None:
        found = [a[a != IGNORE_ID].max(initial=0) for a in (pred_ids, truth_ids)]
        num_classes = int(max(found)) + 1
    result = score(pred_ids, truth_ids, num_classes, None, _class_names(num_classes))
    if coarse_ids is not None:
        base = score(coarse_ids, truth_ids, num_classes, None, _class_names(num_classes))
        repaired = score(pred_ids, truth_ids, num_classes, coarse_ids, _class_names(num_classes))
        result.update({k: repaired[k] for k in ("iou_repaired_wrong", "iou_preserved_right", "iou_imp")})
        result["coarse"] = base
        result["delta"] = {k: round(result[k] - base[k], 4) for k in ("miou", "pixel_accuracy", "boundary_f",
                                                                     "boundary_iou")
                           if result[k] is not None and base[k] is not None}
    return result


def _run(args: argparse.Namespace) -> int:
    print(json.dumps(evaluate_files(args.pred, args.truth, args.coarse, args.num_classes), indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a class map against the truth: mIoU, per-class IoU, pixel accuracy, boundary "
        "F-score (2 px), Boundary IoU (3 px band); with --coarse also IoU_imp and the deltas (JSON)")
    parser.add_argument("--pred", type=Path, required=True, help="predicted class-id raster")
    parser.add_argument("--truth", type=Path, required=True, help="reference class-id raster (255 = ignore)")
    parser.add_argument("--coarse", type=Path, help="the coarse map that --pred refined")
    parser.add_argument("--num-classes", type=int, help="number of classes (default: largest id + 1)")
    parser.set_defaults(func=_run)
