"""What to run: one backend job described in plain values, read from layers and widgets in the main thread.

The toolbox algorithms build a `JobSpec` from their parameters, the dock from its widgets; the runner
(`jobs.runner`) then needs no layer, widget or Processing object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsCoordinateTransformContext,
    QgsCsException,
    QgsRectangle,
)

from ..i18n import tr
from ..limits import MODES, PRECISIONS
from .inputs import RasterSource
from .outcome import JobError

# Ground pixel size for copies of web layers when the model card does not name one.
DEFAULT_PIXEL_SIZE_M = 0.5


def precision_choices() -> List[Tuple[Optional[str], str]]:
    """(job field, label) of each precision a user can pick; None is the device's default."""
    labels = {"auto": tr("auto (bf16 on CPUs with bf16 units, half on GPUs)"), "fp32": tr("fp32"),
              "bf16": tr("bf16 (faster on CPUs with AMX or AVX512-BF16)"), "fp16": tr("fp16 (NVIDIA GPUs only)")}
    return [(None, tr("Default (auto)"))] + [(p, labels.get(p, p)) for p in PRECISIONS]


@dataclass
class JobExtent:
    """The area to process: a rectangle in ``crs`` (an invalid CRS: the input's own coordinates)."""

    rect: QgsRectangle
    crs: QgsCoordinateReferenceSystem = field(default_factory=QgsCoordinateReferenceSystem)

    def in_crs(self, target: QgsCoordinateReferenceSystem, context: QgsCoordinateTransformContext,
               margin: float = 0.0) -> QgsRectangle:
        """The extent in ``target`` (a layer's CRS), grown by ``margin`` times its larger side on each side."""
        rect = QgsRectangle(self.rect)
        if self.crs.isValid() and target.isValid() and self.crs != target:
            try:
                rect = QgsCoordinateTransform(self.crs, target, context).transformBoundingBox(rect)
            except QgsCsException as exc:
                raise JobError(f"The extent cannot be expressed in the layer's CRS {target.authid()} ({exc}). "
                               "Choose an extent over the layer.", "extent") from exc
        if margin:
            rect.grow(margin * max(rect.width(), rect.height()))
        return rect

    def job_fields(self, input_crs: QgsCoordinateReferenceSystem,
                   context: QgsCoordinateTransformContext) -> Tuple[List[float], Optional[str]]:
        """(xmin, ymin, xmax, ymax) and the CRS code the backend gets for this extent.

        The backend understands CRS codes only: an extent in a custom CRS (one without a code) is sent in the
        input's CRS instead; with no CRS on either side the numbers are the input's own coordinates."""
        rect, crs = self.rect, self.crs
        if crs.isValid() and not crs.authid() and input_crs.isValid():
            rect, crs = self.in_crs(input_crs, context), input_crs
        if not crs.isValid() or not input_crs.isValid() or not crs.authid():
            return _corners(rect), None
        return _corners(rect), crs.authid()


@dataclass
class JobSpec:
    """One run: a backend job, plus the dock's extras (the coarse map kept, the changed pixels)."""

    mode: str  # "refine" | "segment"
    input: RasterSource
    output: Path
    coarse: Optional[RasterSource] = None  # a class map to refine instead of the model's own coarse pass
    extent: Optional[JobExtent] = None  # None: the whole input
    model: Optional[str] = None  # a bundled model's name or a .safetensors path; None: the default model
    device: str = "auto"
    precision: Optional[str] = None  # of the networks (auto, fp32, bf16, fp16); None: the device's default
    bands: Optional[List[int]] = None  # 1-based input bands in the model's band order; None: the card's
    steps: Optional[int] = None  # None: the model card's
    band: Optional[int] = None  # px; -1 = rule off; None = the model card's
    vocabulary: Optional[int] = None  # px; -1 = rule off; None = the model card's
    min_confidence: Optional[float] = None  # 0..1; 0 = gate off; None = the model card's
    confidence: Optional[Path] = None  # where the refiner's confidence goes (None: not wanted)
    pixel_size: Optional[float] = None  # the input's metres per pixel; None: from its CRS
    copy_pixel_size_m: float = DEFAULT_PIXEL_SIZE_M  # ground pixel of copies of web layers (the model's)
    coarse_output: Optional[Path] = None  # refine without `coarse`: also keep the model's coarse map here
    changes: Optional[Path] = None  # refine: also write where the refined map differs from the coarse map
    transform_context: QgsCoordinateTransformContext = field(default_factory=QgsCoordinateTransformContext)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.changes is not None and (self.mode != "refine" or (self.coarse is None and self.coarse_output is None)):
            raise ValueError("changed pixels need a refine run with a coarse map to compare with")

    @property
    def outputs(self) -> List[Path]:
        """Every file the run writes (for removal after a failure or cancel)."""
        return [p for p in (self.output, self.confidence, self.coarse_output, self.changes) if p is not None]

    def job_fields(self) -> Dict[str, Any]:
        """The fields every backend job of this run shares (input and coarse paths are added by the runner)."""
        fields: Dict[str, Any] = {"device": self.device, "precision": self.precision}
        if self.model:
            fields["model"] = self.model
        if self.bands:
            fields["bands"] = list(self.bands)
        if self.extent is not None:
            fields["extent"], fields["extent_crs"] = self.extent.job_fields(self.input.crs, self.transform_context)
        # A copied layer has its own, known pixel size: the user's value describes the original.
        if self.pixel_size is not None and not self.input.needs_copy:
            fields["pixel_size"] = self.pixel_size
        return {key: value for key, value in fields.items() if value is not None}

    def refine_fields(self) -> Dict[str, Any]:
        """The refiner's own options."""
        fields = {"steps": self.steps, "band": self.band, "vocabulary": self.vocabulary,
                  "min_confidence": self.min_confidence,
                  "confidence": str(self.confidence) if self.confidence is not None else None}
        return {key: value for key, value in fields.items() if value is not None}


def _corners(rect: QgsRectangle) -> List[float]:
    return [rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()]
