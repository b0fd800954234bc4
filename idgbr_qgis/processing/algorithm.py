"""What IDGBR Refine and IDGBR Segment share: parameters, the job, polygons and the output style.

The algorithm runs in the Processing worker thread: layers are read in `prepareAlgorithm` (main thread),
the run goes through the plugin's job layer (`idgbr_qgis.jobs`, the same as the dock's) in
`processAlgorithm`, and the output layers are named and styled in the main thread once QGIS loads them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from qgis.core import (
    QgsApplication,
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
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.PyQt.QtGui import QIcon

from ..backend_process import BackendManager
from ..i18n import tr
from ..jobs import inputs
from ..jobs.inputs import RasterSource
from ..jobs.outcome import JobCancelled, JobError, result_name, user_message
from ..jobs.runner import JobRunner
from ..jobs.spec import JobExtent, JobSpec, precision_choices
from ..limits import DEVICES, MAX_RULE_PX, MAX_STEPS, MIN_STEPS
from .polygons import polygonize_classes
from .postprocess import style_confidence_on_load, style_on_load

ICON = Path(__file__).resolve().parent.parent / "resources" / "icons" / "idgbr.svg"
RASTER_SUFFIXES = (".tif", ".tiff")


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
    PRECISION = "PRECISION"
    OUTPUT = "OUTPUT"
    CONFIDENCE = "CONFIDENCE"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"

    MODE = "refine"  # the backend job's mode: "refine" or "segment"

    def __init__(self) -> None:
        super().__init__()
        self._input: Optional[RasterSource] = None
        self._coarse: Optional[RasterSource] = None
        self._output: Optional[str] = None
        self._confidence: Optional[str] = None
        self._polygons: Optional[str] = None
        self._classes: List[Dict[str, Any]] = []
        self._names: Dict[str, str] = {}  # output -> the layer name it is loaded with

    def output_label(self) -> str:
        """The OUTPUT parameter's label."""
        return tr("Refined classes")

    # ------------------------------------------------------------------------------------------ description

    def group(self) -> str:
        return tr("Segmentation")

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
        self._add(QgsProcessingParameterRasterLayer(self.INPUT, tr("Input raster")),
                  tr("The image to classify: an aerial or satellite raster. Files on disk are read directly; web, "
                     "virtual and in-memory layers are first copied to a temporary GeoTIFF of the extent."))
        self._add(QgsProcessingParameterBand(self.BANDS, tr("Bands (in the model's order, e.g. red, green, blue)"),
                                             None, self.INPUT, optional=True, allowMultiple=True),
                  tr("The input bands the model reads, in the model's band order (red, green, blue for the bundled "
                     "models). Empty: the model's default bands (1, 2, 3)."), advanced=True)
        if refine:
            self._add(QgsProcessingParameterRasterLayer(self.COARSE, tr("Coarse class map (optional)"),
                                                        optional=True),
                      tr("A class-id raster from any model or classification to refine. Its class ids must be the "
                         "model's. Empty: the bundled coarse segmenter makes one."))
        self._add(QgsProcessingParameterFile(self.MODEL, tr("Model bundle (.safetensors, optional)"),
                                             behavior=QgsProcessingParameterFile.File,
                                             fileFilter=tr("IDGBR model bundles (*.safetensors)"), optional=True),
                  tr("An IDGBR model bundle. Empty: the bundled 5-class land-cover model (dubai5)."), advanced=True)
        self._add(QgsProcessingParameterExtent(self.EXTENT, tr("Extent (optional)"), optional=True),
                  tr("The area to process, in any CRS (it is reprojected to the input's grid). Empty: the whole "
                     "layer."))
        if refine:
            self._add(QgsProcessingParameterNumber(self.STEPS, tr("Diffusion steps (optional)"),
                                                   QgsProcessingParameterNumber.Integer, optional=True,
                                                   minValue=MIN_STEPS, maxValue=MAX_STEPS),
                      tr("Denoising steps of the refiner: more is slower and smoother. Empty: the model's default."))
            self._add(QgsProcessingParameterNumber(self.BAND, tr("Change band in pixels (optional, -1 = off)"),
                                                   QgsProcessingParameterNumber.Integer, optional=True,
                                                   minValue=-1, maxValue=MAX_RULE_PX),
                      tr("The refiner may change a pixel only within this many pixels of a coarse class boundary. "
                         "0 keeps the coarse map, -1 switches the rule off. Empty: the model's default."),
                      advanced=True)
            self._add(QgsProcessingParameterNumber(self.VOCABULARY, tr("Class vocabulary radius in pixels "
                                                                       "(optional, -1 = off)"),
                                                   QgsProcessingParameterNumber.Integer, optional=True,
                                                   minValue=-1, maxValue=MAX_RULE_PX),
                      tr("A pixel may only take a class the coarse map has within this many pixels, so regions are "
                         "never invented or erased. -1 switches the rule off. Empty: the model's default."),
                      advanced=True)
            self._add(QgsProcessingParameterNumber(self.MIN_CONFIDENCE, tr("Minimum confidence for a change "
                                                                           "(optional, 0-1)"),
                                                   QgsProcessingParameterNumber.Double, optional=True,
                                                   minValue=0.0, maxValue=1.0),
                      tr("A pixel takes the refiner's class only where the refiner prefers it over the coarse "
                         "class with at least this probability (the two weighed against each other); elsewhere it "
                         "keeps the coarse class. 0.5 or less lets every preferred change through, 1 keeps the "
                         "coarse map. Empty: the model's default."), advanced=True)
        self._add(QgsProcessingParameterNumber(self.PIXEL_SIZE, tr("Input pixel size in metres (0 = from the "
                                                                   "layer's CRS)"),
                                               QgsProcessingParameterNumber.Double, defaultValue=0.0,
                                               optional=True, minValue=0.0),
                  tr("The ground size of one input pixel, for rasters without a CRS or with wrong metadata. Outside "
                     "the model's range the model works on a resampled copy and the result is written on the "
                     "input's grid. 0: from the layer's CRS (without a CRS: the model's working resolution). Not "
                     "used for layers copied to a temporary GeoTIFF (they are copied at the model's pixel size)."),
                  advanced=True)
        self._add(QgsProcessingParameterEnum(self.DEVICE, tr("Device"), options=list(DEVICES), defaultValue=0),
                  tr("Where the backend runs the model: auto picks a GPU (CUDA, then Apple MPS) when the backend's "
                     "PyTorch can use one."), advanced=True)
        self._add(QgsProcessingParameterEnum(self.PRECISION, tr("Precision"),
                                             options=[label for _, label in precision_choices()], defaultValue=0,
                                             optional=True),  # optional: models saved before it keep working
                  tr("Number format of the networks. bf16 is faster on CPUs with AMX or AVX512-BF16 units and "
                     "changes a few boundary pixels; fp16 runs on NVIDIA GPUs only. The refiner's rules and its "
                     "confidence always use fp32."), advanced=True)
        self._add(QgsProcessingParameterRasterDestination(self.OUTPUT, self.output_label()),
                  tr("GeoTIFF of class ids (uint8) on the input's pixel grid and CRS, with a colour table; loaded "
                     "under the input's and the model's names."))
        if refine:
            self._add(QgsProcessingParameterRasterDestination(self.CONFIDENCE, tr("Refiner confidence"),
                                                              optional=True, createByDefault=False),
                      tr("Optional float GeoTIFF on the input's grid: the refiner's probability (0-1) of the class "
                         "written at each pixel (-1 where the output is nodata). Loaded red where the refiner is "
                         "unsure, clear where it is sure."))
        self._add(QgsProcessingParameterFeatureSink(self.OUTPUT_POLYGONS, tr("Class polygons"),
                                                    QgsProcessing.TypeVectorPolygon, optional=True,
                                                    createByDefault=False),
                  tr("Optional polygons of the classes (GDAL polygonize) with class_id and class_name attributes."))

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
        self._input = self._describe(layer, "input")
        self._coarse = None
        if self.MODE == "refine" and parameters.get(self.COARSE) not in (None, ""):
            coarse = self.parameterAsRasterLayer(parameters, self.COARSE, context)
            if coarse is None:
                raise QgsProcessingException(self.invalidRasterError(parameters, self.COARSE))
            self._coarse = self._describe(coarse, "coarse")
        return True

    def processAlgorithm(self, parameters: Dict[str, Any], context: QgsProcessingContext,
                         feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        assert self._input is not None  # set by prepareAlgorithm
        output = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if Path(output).suffix.lower() not in RASTER_SUFFIXES:
            raise QgsProcessingException(tr(
                "OUTPUT must be a GeoTIFF file: {path} does not end in .tif. Choose a file name ending in .tif."
            ).format(path=output))
        output_path = Path(output).resolve()
        confidence = self._confidence_output(parameters, context, output_path)
        model = self.parameterAsFile(parameters, self.MODEL, context) or None
        spec = JobSpec(
            mode=self.MODE,
            input=self._input,
            output=output_path,
            coarse=self._coarse,
            extent=self._extent(parameters, context),
            model=str(Path(model).resolve()) if model and model.lower().endswith(".safetensors") else model,
            device=DEVICES[self.parameterAsEnum(parameters, self.DEVICE, context)],
            precision=precision_choices()[self.parameterAsEnum(parameters, self.PRECISION, context)][0],
            bands=self.parameterAsInts(parameters, self.BANDS, context) or None,
            steps=self._optional_int(parameters, self.STEPS, context),
            band=self._optional_int(parameters, self.BAND, context),
            vocabulary=self._optional_int(parameters, self.VOCABULARY, context),
            min_confidence=self._optional_double(parameters, self.MIN_CONFIDENCE, context),
            confidence=Path(confidence).resolve() if confidence else None,
            pixel_size=self._pixel_size(parameters, context, feedback),
            transform_context=context.transformContext(),
        )
        runner = JobRunner(BackendManager.instance(), on_progress=_progress_to(feedback), on_step=feedback.pushInfo,
                           is_cancelled=feedback.isCanceled, scratch_dir=Path(QgsProcessingUtils.tempFolder()))
        try:
            result = runner.run(spec)
        except JobCancelled as exc:
            raise QgsProcessingException(str(exc)) from exc
        except JobError as exc:
            raise QgsProcessingException(user_message(exc, PARAMETER_NAMES, tr("(parameter {name})"))) from exc
        finally:
            self._stop_backend_after_run()
        for note in result.notes:
            feedback.pushWarning(note)

        self._classes = result.classes
        self._output = output
        self._confidence = confidence
        what = tr("refined") if self.MODE == "refine" else tr("classes")
        self._names = {output: result_name(self._input.name, what, result.model)}
        if confidence:
            self._names[confidence] = result_name(self._input.name, tr("confidence"), result.model)
        results: Dict[str, Any] = {self.OUTPUT: output}
        if confidence:
            results[self.CONFIDENCE] = confidence
        if parameters.get(self.OUTPUT_POLYGONS) not in (None, ""):
            feedback.pushInfo(tr("Polygonizing the class map…"))
            self._polygons = polygonize_classes(self, parameters, self.OUTPUT_POLYGONS, output, self._classes,
                                                context, feedback)
            results[self.OUTPUT_POLYGONS] = self._polygons
        return results

    def postProcessAlgorithm(self, context: QgsProcessingContext, feedback: QgsProcessingFeedback) -> Dict[str, Any]:
        # Main thread, before QGIS adds the output layers: names after the input and model, and the styles.
        for output, name in self._names.items():
            if context.willLoadLayerOnCompletion(output):
                context.layerToLoadOnCompletionDetails(output).name = name
        for output in (self._output, self._polygons):
            if output:
                style_on_load(context, output, self._classes)
        if self._confidence:
            style_confidence_on_load(context, self._confidence)
        return {}

    # ------------------------------------------------------------------------------------------------ steps

    @staticmethod
    def _describe(layer: QgsRasterLayer, parameter: str) -> RasterSource:
        try:
            return inputs.describe(layer, parameter)
        except JobError as exc:
            raise QgsProcessingException(user_message(exc, PARAMETER_NAMES, tr("(parameter {name})"))) from exc

    @staticmethod
    def _stop_backend_after_run() -> None:
        """qgis_process exits without unloading plugins: stop the service this run started, not leave it behind."""
        if QgsApplication.instance() is not None and QgsApplication.instance().platform() == "qgis_process":
            BackendManager.instance().shutdown()

    def _extent(self, parameters: Dict[str, Any], context: QgsProcessingContext) -> Optional[JobExtent]:
        """EXTENT in its CRS (a bare "xmin,xmax,ymin,ymax" is in the input's); None for the whole layer."""
        if parameters.get(self.EXTENT) in (None, ""):
            return None
        rect = self.parameterAsExtent(parameters, self.EXTENT, context)
        if rect is None or rect.isNull() or rect.isEmpty():
            raise QgsProcessingException(tr(
                "EXTENT is empty: give xmin, xmax, ymin, ymax with xmin < xmax and ymin < ymax, or leave it empty."))
        crs = self.parameterAsExtentCrs(parameters, self.EXTENT, context)
        if not crs.isValid() and self._input is not None:
            crs = self._input.crs
        return JobExtent(QgsRectangle(rect), crs)

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
            feedback.pushWarning(tr("PIXEL_SIZE is not used for this layer: it is copied to a temporary GeoTIFF at "
                                    "the model's pixel size, whose size is known."))
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
            raise QgsProcessingException(tr(
                "CONFIDENCE must be a GeoTIFF file: {path} does not end in .tif. Choose a file name ending in .tif."
            ).format(path=confidence))
        if Path(confidence).resolve() == output:
            raise QgsProcessingException(tr("CONFIDENCE and OUTPUT are the same file: give the confidence its own "
                                            "file name."))
        return confidence


# The job's fields as the toolbox calls them: a failure names the parameter to change.
PARAMETER_NAMES = {"input": "INPUT", "bands": "BANDS", "coarse": "COARSE", "model": "MODEL", "extent": "EXTENT",
                   "steps": "STEPS", "band": "BAND", "vocabulary": "VOCABULARY", "min_confidence": "MIN_CONFIDENCE",
                   "pixel_size": "PIXEL_SIZE", "device": "DEVICE", "precision": "PRECISION", "output": "OUTPUT",
                   "confidence": "CONFIDENCE"}


def _progress_to(feedback: QgsProcessingFeedback) -> Callable[[float, str], None]:
    """The runner's progress on the Processing bar, the backend's message as its text."""
    last = [""]

    def report(percent: float, message: str) -> None:
        feedback.setProgress(percent)
        if message and message != last[0]:
            last[0] = message
            feedback.setProgressText(message)

    return report
