"""Metrics against cases computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from idgbr.evaluate import evaluate_files
from idgbr.metrics import score


def _halves(size: int = 20, split: int = 10) -> np.ndarray:
    ids = np.zeros((size, size), np.uint8)
    ids[:, split:] = 1
    return ids


def test_perfect_prediction():
    truth = _halves()
    result = score(truth, truth, 2)
    assert result["miou"] == result["pixel_accuracy"] == result["boundary_f"] == result["boundary_iou"] == 1.0


def test_one_pixel_shift():
    truth, pred = _halves(split=10), _halves(split=11)
    result = score(pred, truth, 2)
    # class 0: 200 true, 220 predicted, 200 shared -> 200/220; class 1: 180/200
    assert result["per_class_iou"] == {"0": round(200 / 220, 4), "1": 0.9}
    assert result["pixel_accuracy"] == 0.95
    assert result["boundary_f"] == 1.0  # within the 2 px tolerance
    # Boundary IoU, pixels within 3 px of the inner contour: class 0 truth cols 6-9, pred 7-10 -> 3/5;
    # class 1 truth cols 10-13, pred 11-14 -> 3/5
    assert result["boundary_iou"] == 0.6


def test_shift_beyond_tolerance_scores_zero_boundary_f():
    result = score(_halves(split=14), _halves(split=10), 2)
    assert result["boundary_f"] == 0.0


def test_ignored_pixels_do_not_count():
    truth = _halves()
    truth[:, :5] = 255
    pred = _halves()
    pred[:, :5] = 1  # wrong, but where the truth is unlabelled
    assert score(pred, truth, 2)["pixel_accuracy"] == 1.0


def test_repair_score():
    truth, coarse = _halves(split=10), _halves(split=12)
    assert score(truth, truth, 2, coarse)["iou_imp"] == 1.0  # full repair, nothing damaged
    assert score(coarse, truth, 2, coarse)["iou_imp"] == 0.0  # nothing repaired
    damaged = coarse.copy()
    damaged[:, :2] = 1  # repairs nothing and breaks 40 correct pixels
    result = score(damaged, truth, 2, coarse)
    assert result["iou_imp"] < 0


def test_evaluate_command_reports_deltas(tmp_path):
    paths = {}
    for name, ids in (("truth", _halves(split=10)), ("coarse", _halves(split=13)), ("pred", _halves(split=11))):
        paths[name] = tmp_path / f"{name}.tif"
        with rasterio.open(paths[name], "w", driver="GTiff", width=20, height=20, count=1, dtype="uint8",
                           crs="EPSG:32640", transform=from_origin(320000, 2790000, 0.5, 0.5)) as dst:
            dst.write(ids[None])
    result = evaluate_files(paths["pred"], paths["truth"], paths["coarse"])
    json.dumps(result)
    assert result["delta"]["boundary_f"] == pytest.approx(1.0)
    assert result["delta"]["miou"] > 0
    assert 0 < result["iou_imp"] <= 1


@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (5, 3), (64, 97)])
def test_boundaries_and_tolerance_bands_are_the_morphological_ones(shape):
    """The fast boundary and distance sets are exactly erosion / disk dilation (the textbook definitions the
    published BF and Boundary IoU scores use), at any image size, so scores stay comparable."""
    from scipy import ndimage

    from idgbr.metrics import _disk, _within, class_boundaries

    rng = np.random.default_rng(sum(shape))
    ids = rng.integers(0, 3, size=(max(1, shape[0] // 4), max(1, shape[1] // 4))).repeat(4, 0).repeat(4, 1)
    ids = ids[: shape[0], : shape[1]]
    ids[rng.random(ids.shape) < 0.05] = 2  # speckle: one-pixel regions
    for cls in range(3):
        region = ids == cls
        eroded = ndimage.binary_erosion(region, structure=ndimage.generate_binary_structure(2, 1), border_value=1)
        edges = class_boundaries(ids, cls)
        assert np.array_equal(edges, region & ~eroded)
        for distance in (1, 2, 3, 5):
            expected = ndimage.binary_dilation(edges, structure=_disk(distance)) if edges.any() else edges
            assert np.array_equal(_within(edges, distance), expected)
