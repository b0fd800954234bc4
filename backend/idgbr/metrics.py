"""Segmentation and boundary metrics: mIoU, pixel accuracy, boundary F-score, Boundary IoU, IoU_imp.

Every metric is accumulated from counts, so a whole tile (several images) is scored as one dataset.
Pixels whose truth is IGNORE_ID are left out everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .classes import IGNORE_ID

BF_TOLERANCE = 2  # px, boundary F-score (Csurka et al. 2013)
BIOU_WIDTH = 3  # px, width of the inner contour band of Boundary IoU (Cheng et al. 2021)


def confusion(pred: np.ndarray, truth: np.ndarray, num_classes: int, mask: np.ndarray | None = None) -> np.ndarray:
    """(K, K) counts, rows = truth, columns = prediction, over valid pixels (and ``mask`` if given)."""
    valid = (truth != IGNORE_ID) & (pred < num_classes) & (truth < num_classes)
    if mask is not None:
        valid &= mask
    index = truth[valid].astype(np.int64) * num_classes + pred[valid].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for classes absent from both truth and prediction."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def class_boundaries(ids: np.ndarray, cls: int) -> np.ndarray:
    """Inner contour of class ``cls``: its pixels with a 4-neighbour of another class (image edges excluded).

    Shifted ANDs instead of a morphological erosion: the same set, about 10 times faster (validation scores
    every image many times)."""
    region = ids == cls
    inner = region.copy()
    inner[1:] &= region[:-1]
    inner[:-1] &= region[1:]
    inner[:, 1:] &= region[:, :-1]
    inner[:, :-1] &= region[:, 1:]
    return region & ~inner


def _disk(radius: int) -> np.ndarray:
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _within(boundary: np.ndarray, distance: int) -> np.ndarray:
    """Pixels within ``distance`` (Euclidean) of any boundary pixel: a dilation by the disk of that radius.

    The disk is a stack of horizontal runs, so the dilation is a few 1-D dilations (one per run width)
    ORed in at their row offsets: the same set as a 2-D binary dilation, about 30 times faster."""
    out = np.zeros_like(boundary)
    if not boundary.any():
        return out
    height = boundary.shape[0]
    runs: dict[int, np.ndarray] = {}  # half-width -> the boundary dilated along rows by it
    for dy in range(-distance, distance + 1):
        if abs(dy) >= height:
            continue
        half = int(np.sqrt(distance**2 - dy**2))
        if half not in runs:
            run = boundary.copy()
            for dx in range(1, half + 1):
                run[:, dx:] |= boundary[:, :-dx]
                run[:, :-dx] |= boundary[:, dx:]
            runs[half] = run
        out[max(0, dy):height + min(0, dy)] |= runs[half][max(0, -dy):height - max(0, dy)]
    return out


def _inner_band(ids: np.ndarray, cls: int, width: int) -> np.ndarray:
    region = ids == cls
    if not region.any():
        return region
    return region & _within(class_boundaries(ids, cls), width)


@dataclass
class Scores:
    """Accumulates counts over images; ``result()`` gives the metrics as a JSON-ready dict."""

    num_classes: int
    class_names: list[str] | None = None
    matrix: np.ndarray = field(init=False)
    bf: np.ndarray = field(init=False)  # per class: matched pred, pred, matched truth, truth boundary pixels
    biou: np.ndarray = field(init=False)  # per class: intersection, union
    repair: np.ndarray = field(init=False)  # confusion inside coarse-wrong (0) and coarse-right (1) regions
    has_coarse: bool = False

    def __post_init__(self) -> None:
        k = self.num_classes
        self.matrix = np.zeros((k, k), np.int64)
        self.bf = np.zeros((k, 4), np.int64)
        self.biou = np.zeros((k, 2), np.int64)
        self.repair = np.zeros((2, k, k), np.int64)

    def add(self, pred: np.ndarray, truth: np.ndarray, coarse: np.ndarray | None = None) -> None:
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
        valid = truth != IGNORE_ID
        self.matrix += confusion(pred, truth, self.num_classes)
        for cls in range(self.num_classes):
            pred_edge = class_boundaries(pred, cls) & valid
            truth_edge = class_boundaries(truth, cls) & valid
            self.bf[cls] += [
                (pred_edge & _within(truth_edge, BF_TOLERANCE)).sum(), pred_edge.sum(),
                (truth_edge & _within(pred_edge, BF_TOLERANCE)).sum(), truth_edge.sum(),
            ]
            pred_band = _inner_band(pred, cls, BIOU_WIDTH) & valid
            truth_band = _inner_band(truth, cls, BIOU_WIDTH) & valid
            self.biou[cls] += [(pred_band & truth_band).sum(), (pred_band | truth_band).sum()]
        if coarse is not None:
            self.has_coarse = True
            wrong = coarse != truth
            self.repair[0] += confusion(pred, truth, self.num_classes, wrong)
            self.repair[1] += confusion(pred, truth, self.num_classes, ~wrong)

    def absorb(self, other: Scores) -> Scores:
        """Add another accumulator's counts (images scored once, combined into several subsets)."""
        self.matrix += other.matrix
        self.bf += other.bf
        self.biou += other.biou
        self.repair += other.repair
        self.has_coarse |= other.has_coarse
        return self

    def result(self, k_imp: float = 1.0) -> dict:
        iou = iou_from_confusion(self.matrix)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        present = self.bf[:, 3] > 0
        precision = np.where(self.bf[:, 1] > 0, self.bf[:, 0] / np.maximum(self.bf[:, 1], 1), 0.0)
        recall = np.where(self.bf[:, 3] > 0, self.bf[:, 2] / np.maximum(self.bf[:, 3], 1), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            bf_class = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
            biou_class = np.where(self.biou[:, 1] > 0, self.biou[:, 0] / np.maximum(self.biou[:, 1], 1), np.nan)
        out = {
            "miou": _round(np.nanmean(iou)),
            "pixel_accuracy": _round(np.diag(self.matrix).sum() / max(1, self.matrix.sum())),
            "per_class_iou": {names[i]: _round(iou[i]) for i in range(self.num_classes)},
            "boundary_f": _round(bf_class[present].mean() if present.any() else np.nan),
            "boundary_iou": _round(np.nanmean(biou_class)),
            "per_class_boundary_f": {names[i]: _round(bf_class[i]) for i in range(self.num_classes) if present[i]},
            "pixels": int(self.matrix.sum()),
        }
        if self.has_coarse:
            # Repair score: IoU in the regions the coarse map got wrong (repair) and right (preservation).
            iou_wrong = np.nanmean(iou_from_confusion(self.repair[0]))
            iou_right = np.nanmean(iou_from_confusion(self.repair[1]))
            out["iou_repaired_wrong"] = _round(iou_wrong)
            out["iou_preserved_right"] = _round(iou_right)
            out["iou_imp"] = _round(iou_wrong - k_imp * (1 - iou_right))
        return out


def _round(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


def score(pred: np.ndarray, truth: np.ndarray, num_classes: int, coarse: np.ndarray | None = None,
          class_names: list[str] | None = None) -> dict:
    """Metrics of one prediction against the truth (and the repair score against a coarse map)."""
    scores = Scores(num_classes, class_names)
    scores.add(pred, truth, coarse)
    return scores.result()
