"""What IDGBR Refine and IDGBR Segment share: parameters, the backend job, polygons and the output style.

The algorithm runs in the Processing worker thread: layers are read in `prepareAlgorithm` (main thread),
the job goes to the backend service and is polled from `processAlgorithm`, and the output layer is styled
by a post-processor in the main thread once QGIS loads it.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from qgis.core import (
    QgsApplication,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBand,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterExtent,
    QgsProcessingParameterFeatureSink,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingUtils,
    QgsRectangle,
)
from qgis.PyQt.QtGui import QIcon

from ..backend import BackendManager, BackendUnavailable
from . import sources
from .polygons import polygonize_classes
from .postprocess import style_confidence_on_load, style_on_load

ICON = Path(__file__).resolve().parent.parent / "resources" / "icons" / "idgbr.svg"
DEVICES = ["auto", "cpu", "cuda"]
RASTER_SUFFIXES = (".tif", ".tiff")
# Ground pixel size for copies of web layers when the model card does not name one.
DEFAULT_PIXEL_SIZE_M = 0.5


class IdgbrAlgorithm(QgsProcessingAlgorithm):
    """Base of the IDGBR algorithms; subclasses set MODE and the texts."""

    INPUT = "INPUT"
    BANDS = "BANDS"
    COARSE = "COARSE"
    MODEL = "MODEL"
    EXTENT = "EXTENT"
    STEPS = "STEPS"
    BAND = "BAND"
    VOCABULARY = "VOCABULARY"
    MIN_CONFIDENCE = "MIN_CONFIDENCE"
    PIXEL_SIZE = "PIXEL_SIZE"
    DEVICE = "DEVICE"
    OUTPUT = "OUTPUT"
    CONFIDENCE = "CONFIDENCE"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"

    MODE = "refine"  # the backend job's mode: "refine" or "segment"
    OUTPUT_LABEL = "Refined classes"

    def __init__(self) -> None:
        super().__init__()
        self._input: Optional[sources.RasterSource] = None
        self._coarse: Optional[sources.RasterSource] = None
        self._output: Optional[str] = None
        self._confidence: Optional[str] = None
        self._polygons: Optional[str] = None
        self._classes: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ description

    def group(self) -> str:
        return "Segmentation"

    def groupId(self) -> str:
        return "segmentation"

    def icon(self) -> QIcon:
        return QIcon(str(ICON))

    def svgIconPath(self) -> str:
        return str(ICON)

    def tags(self) -> List[str]:
        return ["idgbr", "segmentation", "classification", "land cover", "deep learning", "diffusion",
                "boundary", "refine", "aerial", "satellite"]

    def flags(self) -> QgsProcessingAlgorithm.Flags:
        # Deliberately without FlagNoThreading: the work happens in the backend process, the worker thread
        # only waits for it, so QGIS stays responsive.
        return super().flags() | QgsProcessingAlgorithm.FlagCanCancel | QgsProcessingAlgorithm.FlagSupportsBatch

    def createInstance(self) -> IdgbrAlgorithm:
        return type(self)()

    # ------------------------------------------------------------------------------------------- parameters

    def initAlgorithm(self, config: Optional[Dict[str, Any]] = None) -> None:
        refine = self.MODE == "refine"
        self._add(QgsProcessingParameterRasterLayer(self.INPUT, "Input raster"),
                  "The image to classify: an aerial or satellite raster. Files on disk are read directly; web, "
                  "virtual and in-memory layers are first copied to a temporary GeoTIFF of the extent.")
        self._add(QgsProcessingParameterBand(self.BANDS, "Bands (in the model's order, e.g. red, green, blue)",
                                             None, self.INPUT, optional=True, allowMultiple=True),
                  "The input bands the model reads, in the model's band order (red, green, blue for the bundled "
                  "models). Empty: the model's default bands (1, 2, 3).", advanced=True)
        if refine:
            self._add(QgsProcessingParameterRasterLayer(self.COARSE, "Coarse class map (optional)", optional=True),
                      "A class-id raster from any model or classification to refine. Its class ids must be the "
                      "model's. Empty: the bundled coarse segmenter makes one.")
        self._add(QgsProcessingParameterFile(self.MODEL, "Model bundle (.safetensors, optional)",
                                             behavior=QgsProcessingParameterFile.File,
                                             fileFilter="IDGBR model bundles (*.safetensors)", optional=True),
                  "An IDGBR model bundle. Empty: the bundled 5-class land-cover model (dubai5).", advanced=True)
        self._add(QgsProcessingParameterExtent(self.EXTENT, "Extent (optional)", optional=True),
                  "The area to process, in any CRS (it is reprojected to the input's grid). Empty: the whole layer.")
        if refine:
            self._add(QgsProcessingParameterNumber(self.STEPS, "Diffusion steps (optional)",
                                                   QgsProcessingParameterNumber.Integer, optional=True,
                                                   minValue=1, maxValue=100),
                      "Denoising steps of the refiner: more is slower and smoother. Empty: the model's default.")
            self._add(QgsProcessingParameterNumber(self.BAND, "Change band in pixels (optional, -1 = off)",
                                                   QgsProcessingParameterNumber.Integer, optional=True,
                                                   minValue=-1, maxValue=1024),
                      "The refiner may change a pixel only within this many pixels of a coarse class boundary. "
                      "0 keeps the coarse map, -1 switches the rule off. Empty: the model's default.",
                      advanced=True)
            self._add(QgsProcessingParameterNumber(self.VOCABULARY, "Class vocabulary radius in pixels (optional, "
                                                   "-1 = off)", QgsProcessingParameterNumber.Integer, optional=True,
                                                   minValue=-1, maxValue=1024),
                      "A pixel may only take a class the coarse map has within this many pixels, so regions are "
                      "never invented or erased. -1 switches the rule off. Empty: the model's default.",
                      advanced=True)
            self._add(QgsProcessingParameterNumber(self.MIN_CONFIDENCE, "Minimum confidence for a change "
                                                   "(optional, 0-1)", QgsProcessingParameterNumber.Double,
                                                   optional=True, minValue=0.0, maxValue=1.0),
                      "A pixel takes the refiner's class only where the refiner's probability of it is at least "
                      "this; elsewhere it keeps the coarse class. 0 switches the gate off, 1 keeps the coarse map. "
                      "Empty: the model's default.", advanced=True)
        self._add(QgsProcessingParameterNumber(self.PIXEL_SIZE, "Input pixel size in metres (0 = from the layer's "
                                               "CRS)", QgsProcessingParameterNumber.Double, defaultValue=0.0,
                                               optional=True, minValue=0.0),
                  "The ground size of one input pixel, for rasters without a CRS or with wrong metadata. Outside "
                  "the model's range the model works on a resampled copy and the result is written on the input's "
                  "grid. 0: from the layer's CRS (without a CRS: the model's working resolution). Not used for "
                  "layers copied to a temporary GeoTIFF (they are copied at the model's pixel size).", advanced=True)
        self._add(QgsProcessingParameterEnum(self.DEVICE, "Device", options=DEVICES, defaultValue=0),
                  "Where the backend runs the model: auto picks the GPU when the backend's PyTorch can use one.",
                  advanced=True)
        self._add(QgsProcessingParameterRasterDestination(self.OUTPUT, self.OUTPUT_LABEL),
                  "GeoTIFF of class ids (uint8) on the input's pixel grid and CRS, with a colour table.")
        if refine:
            self._add(QgsProcessingParameterRasterDestination(self.CONFIDENCE, "Refiner confidence", optional=True,
                                                              createByDefault=False),
                      "Optional float GeoTIFF on the input's grid: the refiner's probability (0-1) of the class "
                      "written at each pixel (-1 where the output is nodata). Loaded red where the refiner is "
                      "unsure, clear where it is sure.")
        self._add(QgsProcessingParameterFeatureSink(self.OUTPUT_POLYGONS, "Class polygons",
                                                    QgsProcessing.TypeVectorPolygon, optional=True,
                                                    createByDefault=False),
                  "Optional polygons of the classes (GDAL polygonize) with class_id and class_name attributes.")

    def _add(self, parameter: QgsProcessingParameterDefinition, help_text: str, advanced: bool = False) -> None:
        parameter.setHelp(help_text)
        if advanced:
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(parameter)

    # -------------------------------------------------------------------------------------------------- run

    def prepareAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> bool:
        # Main thread: layers belong to it; the worker gets plain descriptions and cloned providers.
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, self.INPUT))
        self._input = sources.describe(layer)
        self._coarse = None
        if self.MODE == "refine" and parameters.get(self.COARSE) not in (None, ""):
            coarse = self.parameterAsRasterLayer(parameters, self.COARSE, context)
            if coarse is None:
                raise QgsProcessingException(self.invalidRasterError(parameters, self.COARSE))
            self._coarse = sources.describe(coarse)
        return True

    def processAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        assert self._input is not None  # set by prepareAlgorithm
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if Path(output).suffix.lower() not in RASTER_SUFFIXES:
            raise QgsProcessingException(
                f"OUTPUT must be a GeoTIFF file: {output} does not end in .tif. Choose a file name ending in .tif."
            )
        output_path = Path(output).resolve()
        confidence = self._confidence_output(parameters, context, output_path)
        extent, extent_crs = self._extent(parameters, context)
        polygons_wanted = parameters.get(self.OUTPUT_POLYGONS) not in (None, "")

        feedback.pushInfo("Connecting to the IDGBR backend service…")
        client = self._client()

        model = self.parameterAsFile(parameters, self.MODEL, context) or None
        card = self._card(client, model)
        pixel_size = float(card.get("pixel_size_m") or DEFAULT_PIXEL_SIZE_M) if card else DEFAULT_PIXEL_SIZE_M

        with tempfile.TemporaryDirectory(prefix="idgbr_", dir=QgsProcessingUtils.tempFolder()) as scratch:
            input_path = self._readable(self._input, Path(scratch) / "input.tif", extent, extent_crs, pixel_size,
                                        context, feedback)
            coarse_path = None
            if self._coarse is not None:
                # A margin: the input's window snaps outwards to its own pixels, the coarse copy must cover it.
                coarse_path = self._readable(self._coarse, Path(scratch) / "coarse.tif", extent, extent_crs,
                                             pixel_size, context, feedback, margin=0.1)
            fields = {
                "input": str(input_path),
                "output": str(output_path),
                "mode": self.MODE,
                "coarse": str(coarse_path) if coarse_path else None,
                "model": str(Path(model).resolve()) if model and model.lower().endswith(".safetensors") else model,
                "steps": self._optional_int(parameters, self.STEPS, context),
                "band": self._optional_int(parameters, self.BAND, context),
                "vocabulary": self._optional_int(parameters, self.VOCABULARY, context),
                "min_confidence": self._optional_double(parameters, self.MIN_CONFIDENCE, context),
                "confidence": str(Path(confidence).resolve()) if confidence else None,
                "device": DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
                "bands": self.parameterAsInts(parameters, self.BANDS, context) or None,
                "extent": list(extent) if extent else None,
                "extent_crs": extent_crs if extent else None,
                "pixel_size": self._pixel_size(parameters, context, feedback),
            }
            fields = {key: value for key, value in fields.items() if value is not None}
            try:
                result = self._run_job(client, fields, feedback)
            finally:
                self._stop_backend_after_run()

        self._classes = self._class_table(result, card)
        self._output = output
        self._confidence = confidence
        results: Dict[str, Any] = {self.OUTPUT: output}
        if confidence:
            results[self.CONFIDENCE] = confidence
        if polygons_wanted:
            feedback.pushInfo("Polygonizing the class map…")
            self._polygons = polygonize_classes(self, parameters, self.OUTPUT_POLYGONS, output, self._classes,
                                                context, feedback)
            results[self.OUTPUT_POLYGONS] = self._polygons
        return results

    def postProcessAlgorithm(self, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        # Main thread, before QGIS adds the output layers: attach the class style to the raster.
        for output in (self._output, self._polygons):
            if output:
                style_on_load(context, output, self._classes)
        if self._confidence:
            style_confidence_on_load(context, self._confidence)
        return {}

    # ------------------------------------------------------------------------------------------------ steps

    def _client(self) -> Any:
        from ..backend_client import BackendError

        try:
            return BackendManager.instance().client()
        except (BackendUnavailable, BackendError) as exc:
            raise QgsProcessingException(f"The IDGBR backend is not available: {exc}") from exc

    @staticmethod
    def _stop_backend_after_run() -> None:
        """qgis_process exits without unloading plugins: stop the service this run started, not leave it behind."""
        if QgsApplication.instance() is not None and QgsApplication.instance().platform() == "qgis_process":
            BackendManager.instance().shutdown()

    def _card(self, client: Any, model: Optional[str]) -> Dict[str, Any]:
        """The model card of a bundled model (by name or path), or {} for a bundle the service does not list."""
        from ..backend_client import BackendError

        try:
            listing = client.models()
        except BackendError:
            return {}
        entries = listing.get("models", []) if isinstance(listing, dict) else list(listing or [])
        wanted = model or "dubai5"
        for entry in entries:
            if not isinstance(entry, dict) or not entry.get("card"):
                continue
            if entry.get("name") == wanted or (model and _same_path(entry.get("path"), model)):
                return dict(entry["card"])
        return {}

    def _extent(self, parameters: Dict[str, Any], context: QgsProcessingContext
                ) -> Tuple[Optional[Tuple[float, float, float, float]], Optional[str]]:
        """EXTENT as (xmin, ymin, xmax, ymax) and the authid of its CRS; (None, None) for the whole layer."""
        if parameters.get(self.EXTENT) in (None, ""):
            return None, None
        rect = self.parameterAsExtent(parameters, self.EXTENT, context)
        if rect is None or rect.isNull() or rect.isEmpty():
            raise QgsProcessingException(
                "EXTENT is empty: give xmin, xmax, ymin, ymax with xmin < xmax and ymin < ymax, or leave it empty."
            )
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        layer_crs = self._input.crs if self._input else QgsCoordinateReferenceSystem()
        if not crs.isValid():
            crs = layer_crs  # a bare "xmin,xmax,ymin,ymax" is in the layer's CRS
        if crs.isValid() and not crs.authid() and layer_crs.isValid() and crs != layer_crs:
            # A custom CRS has no code the backend understands: send the extent in the layer's CRS instead.
            rect = QgsCoordinateTransform(crs, layer_crs, context.transformContext()).transformBoundingBox(rect)
            crs = layer_crs
        values = (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum())
        return values, (crs.authid() or None) if crs.isValid() else None

    def _readable(self, source: sources.RasterSource, target: Path,
                  extent: Optional[Tuple[float, float, float, float]], extent_crs: Optional[str], pixel_size: float,
                  context: QgsProcessingContext, feedback: QgsProcessingFeedback, margin: float = 0.0) -> Path:
        """A file the backend can open for ``source``: its own, or a temporary copy of the extent (grown by
        ``margin`` times its size on each side)."""
        if not source.needs_copy:
            return source.path
        feedback.pushInfo(f"Copying '{source.name}' to a temporary GeoTIFF the backend can read…")
        window = None
        if extent is not None:
            window = QgsRectangle(*extent)
            crs = QgsCoordinateReferenceSystem(extent_crs) if extent_crs else source.crs
            if crs.isValid() and source.crs.isValid() and crs != source.crs:
                window = QgsCoordinateTransform(crs, source.crs, context.transformContext()).transformBoundingBox(
                    window)
            if margin:
                window.grow(margin * max(window.width(), window.height()))
        return sources.export(source, target, window, pixel_size, context.transformContext(), feedback)

    def _run_job(self, client: Any, fields: Dict[str, Any], feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        """Submit the job and wait for it, with its progress on the bar. Returns the job's last status."""
        from ..backend_client import BackendError, JobCancelled

        last_message = [""]

        def on_progress(percent: float, message: str = "") -> None:
            feedback.setProgress(max(0.0, min(100.0, float(percent))))
            if message and message != last_message[0]:
                last_message[0] = message
                feedback.setProgressText(message)

        try:
            job_id = client.submit(**fields)
            feedback.pushInfo(f"Backend job {job_id} queued.")
            status = client.wait(job_id, on_progress=on_progress, is_cancelled=feedback.isCanceled)
        except JobCancelled as exc:
            raise QgsProcessingException("Cancelled: no output was written.") from exc
        except BackendError as exc:
            raise QgsProcessingException(_backend_message(exc)) from exc
        status = status if isinstance(status, dict) else {}
        result = status.get("result") if isinstance(status.get("result"), dict) else {}
        for note in result.get("notes") or []:
            feedback.pushWarning(str(note))
        return status

    def _optional_int(self, parameters: Dict[str, Any], name: str, context: QgsProcessingContext) -> Optional[int]:
        if self.parameterDefinition(name) is None or parameters.get(name) in (None, ""):
            return None
        return self.parameterAsInt(parameters, name, context)

    def _optional_double(self, parameters: Dict[str, Any], name: str, context: QgsProcessingContext
                         ) -> Optional[float]:
        if self.parameterDefinition(name) is None or parameters.get(name) in (None, ""):
            return None
        return self.parameterAsDouble(parameters, name, context)

    def _pixel_size(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                    feedback: QgsProcessingFeedback) -> Optional[float]:
        """PIXEL_SIZE for the job: None for 0 / empty (the backend reads the raster's CRS) and for copied layers,
        whose copy has its own, known pixel size."""
        value = self._optional_double(parameters, self.PIXEL_SIZE, context)
        if not value:
            return None
        if self._input is not None and self._input.needs_copy:
            feedback.pushWarning("PIXEL_SIZE is not used for this layer: it is copied to a temporary GeoTIFF at the "
                                 "model's pixel size, whose size is known.")
            return None
        return float(value)

    def _confidence_output(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                           output: Path) -> Optional[str]:
        """The CONFIDENCE destination, or None when it is not wanted (segment, or left empty)."""
        if self.parameterDefinition(self.CONFIDENCE) is None or parameters.get(self.CONFIDENCE) in (None, ""):
            return None
        confidence = self.parameterAsOutputLayer(parameters, self.CONFIDENCE, context)
        if not confidence:
            return None
        if Path(confidence).suffix.lower() not in RASTER_SUFFIXES:
            raise QgsProcessingException(
                f"CONFIDENCE must be a GeoTIFF file: {confidence} does not end in .tif. Choose a file name ending "
                "in .tif."
            )
        if Path(confidence).resolve() == output:
            raise QgsProcessingException("CONFIDENCE and OUTPUT are the same file: give the confidence its own "
                                         "file name.")
        return confidence

    @staticmethod
    def _class_table(status: Dict[str, Any], card: Dict[str, Any]) -> List[Dict[str, Any]]:
        """The output's classes: from the job result when it carries them, else from the model card."""
        result = status.get("result") if isinstance(status.get("result"), dict) else {}
        for holder in (result, result.get("card") if isinstance(result.get("card"), dict) else {}, card):
            classes = holder.get("classes") if isinstance(holder, dict) else None
            if isinstance(classes, list) and classes:
                return [dict(c) for c in classes if isinstance(c, dict)]
        return []


# The engine words its messages for the `idgbr` command; in QGIS the same options are these parameters.
_FLAG_NAMES = {"--bands": "BANDS", "--extent": "EXTENT", "--coarse": "COARSE", "--steps": "STEPS",
               "--band": "BAND", "--vocabulary": "VOCABULARY", "--min-confidence": "MIN_CONFIDENCE",
               "--confidence": "CONFIDENCE", "--model": "MODEL", "--device": "DEVICE",
               "--pixel-size": "PIXEL_SIZE"}


def _backend_message(exc: Exception) -> str:
    """The backend's own message, without the HTTP wrapping of a rejected request, in the toolbox's words."""
    text = str(exc)
    match = re.match(r"^[A-Z]+ /\S+ failed with HTTP 4\d\d: (.*)$", text, re.S)
    if match:
        text = match.group(1)
    return re.sub(r"--[a-z-]+\b", lambda m: _FLAG_NAMES.get(m.group(0), m.group(0)), text)


def _same_path(a: Optional[str], b: Optional[str]) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False
