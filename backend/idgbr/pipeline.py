"""One run of the product: INPUT raster -> class-id GeoTIFF (and, on request, the refiner's confidence),
through the coarse segmenter and (in refine mode) the diffusion refiner. Used by the command line, the
service and the demo."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from rasterio.windows import Window

from . import __version__
from .card import ModelCard
from .errors import Cancelled, IdgbrError, blame
from .limits import MAX_RULE_PX, MAX_SEED, MAX_STEPS, MAX_TILE, MIN_STEPS, MIN_TILE, MODES
from .model_bundle import load_bundle
from .precision import check_precision, precision_note, resolve_precision
from .raster.bands import make_scaler, select_bands
from .raster.engine import Engine, EngineConfig, EngineStats, RowWriter
from .raster.io import (
    CONFIDENCE_NODATA,
    NODATA,
    CoarseSource,
    ConfidenceWriter,
    GeoTiffWriter,
    OutputWriter,
    check_output,
    commit_all,
    extent_window,
    gdal_env,
    has_masks,
    open_raster,
    remove_stale_temps,
    same_file,
)
from .raster.resample import GridCoarse, UpsampledWriter, VirtualGrid
from .resolution import check_pixel_size_option, detect_pixel_size, metres, plan_resolution, same_size

if TYPE_CHECKING:
    from .distributed import Cluster

log = logging.getLogger("idgbr")

BLOCK_WIDTH = 8192  # column block width for tiles up to BLOCK_TILE px: bounds buffer memory of wide rasters
BLOCK_TILE = 512
IO_THREAD = True  # the engine reads and writes on a background thread (tests compare with False)
# Test hook: with this variable set to a file path, a run creates that file once its temporary outputs exist
# and then waits there until it is cancelled or interrupted (at most HOLD_LIMIT_S), so tests can stop a run
# at a known point instead of guessing how long it takes.
HOLD_ENV = "IDGBR_TEST_HOLD"
HOLD_LIMIT_S = 600.0


@dataclass
class RunOptions:
    input: Path
    output: Path
    mode: str = "refine"  # "refine" | "segment"
    coarse: Path | None = None  # class-id raster from any model; refine only
    model: str | Path | None = None  # a bundled model's name or a bundle file; None -> bundled dubai5
    steps: int | None = None  # None -> the card's sampler.steps
    device: str = "auto"  # auto | cpu | cuda | mps
    bands: list[int] | None = None  # 1-based input bands in the model's band order
    extent: tuple[float, float, float, float] | None = None  # xmin, ymin, xmax, ymax
    extent_crs: str | None = None  # e.g. "EPSG:4326"; None -> the raster's CRS
    tile: int | None = None
    overlap: int | None = None
    band: int | None = None  # refine: change only within this many px of a coarse boundary; -1 off; None card
    vocabulary: int | None = None  # refine: only classes the coarse map has within this many px; -1 off; None card
    min_confidence: float | None = None  # refine: keep a change only at this preference; None: card
    confidence: Path | None = None  # refine: also write the float32 confidence GeoTIFF here
    seed: int = 0
    pixel_size: float | None = None  # INPUT's metres per pixel; None -> from its georeference (idgbr.resolution)
    precision: str | None = None  # of the networks: auto | fp32 | bf16 | fp16; None -> the device's default


@dataclass
class RunResult:
    output: Path
    mode: str
    model: str
    device: str
    width: int
    height: int
    seconds: float
    tiles: int  # tiles of the last pass
    tiles_refined: int  # tiles that went through the refiner (the others had no class boundary)
    steps: int
    classes: list[dict]
    class_pixels: dict[int, int]  # written pixels per class id
    nodata_pixels: int
    notes: list[str] = field(default_factory=list)  # what the run decided for the user (scaling, CRS)
    coarse_tiles: int = 0  # tiles through the coarse segmenter (0 with --coarse)
    tile_shape: tuple[int, int] = (0, 0)  # (rows, cols) of each tile
    # The refiner's rules in effect (refine mode; None in segment mode): -1 / 0.0 = off.
    band: int | None = None
    vocabulary: int | None = None
    min_confidence: float | None = None
    changed_pixels: int = 0  # written pixels whose class differs from the coarse map (refine mode)
    confidence: Path | None = None  # the confidence GeoTIFF, when one was written
    # Metres per pixel of INPUT (and OUTPUT) and of the grids the passes worked on (idgbr.resolution).
    input_pixel_m: float = 0.0
    coarse_pixel_m: float = 0.0  # 0.0 with --coarse (no coarse pass)
    refine_pixel_m: float = 0.0  # 0.0 in segment mode
    precision: str = "fp32"  # the networks' precision in this run: fp32, bf16 or fp16 (auto resolved)

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def refined_share(self) -> float:
        return self.tiles_refined / self.tiles if self.tiles else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output)
        data["confidence"] = str(self.confidence) if self.confidence is not None else None
        data["class_pixels"] = {str(k): v for k, v in self.class_pixels.items()}
        data["megapixels"] = self.megapixels
        data["refined_share"] = self.refined_share
        return data


def block_width(tile: int) -> int:
    """Column block width for ``tile`` px tiles: the blends a block holds are a few tile rows high and a block
    wide, so larger tiles get narrower blocks. A 1024-row band of a 20,000 px wide raster peaked at 1.1 GB
    (fp32) with 512 px tiles in 8192 px blocks and with 768 px tiles in 5461 px blocks; 1024 px tiles took
    1.7 GB even in 4096 px blocks (a tile's activations grow with its area)."""
    return BLOCK_WIDTH * BLOCK_TILE // max(tile, BLOCK_TILE)


def default_batch(device_type: str) -> int:
    # CPU gains nothing from batches (threads already fill the cores), and one tile per batch keeps memory
    # and the wait for a cancel (checked between batches) small.
    return 8 if device_type == "cuda" else 1


def _check_int(name: str, value: int | None, low: int, high: int, flag: str, hint: str = "",
               parameter: str | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise IdgbrError(f"{name} must be a whole number from {low} to {high}{hint} (got {value!r}); fix {flag}.",
                         parameter or name)


def _check_probability(name: str, value: float | None, flag: str, hint: str = "",
                       parameter: str | None = None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise IdgbrError(f"{name} must be a number from 0 to 1{hint} (got {value!r}); fix {flag}.", parameter or name)


def _validate(options: RunOptions) -> None:
    if options.mode not in MODES:
        raise IdgbrError(f"Unknown mode {options.mode!r}: use 'refine' or 'segment'.", "mode")
    if options.mode == "segment" and options.coarse is not None:
        raise IdgbrError("A coarse map is only used by refine; drop --coarse or run 'idgbr refine'.", "coarse")
    _check_int("steps", options.steps, MIN_STEPS, MAX_STEPS, "--steps")
    _check_int("tile", options.tile, MIN_TILE, MAX_TILE, "--tile")
    _check_int("overlap", options.overlap, 0, MAX_TILE // 2, "--overlap")
    _check_int("band", options.band, -1, MAX_RULE_PX, "--band", " (-1 or 'off': rule off)")
    _check_int("vocabulary", options.vocabulary, -1, MAX_RULE_PX, "--vocabulary", " (-1 or 'off': rule off)")
    _check_probability("min confidence", options.min_confidence, "--min-confidence", " (0: gate off)",
                       "min_confidence")
    _check_int("seed", options.seed, 0, MAX_SEED, "--seed")
    with blame("pixel_size"):
        check_pixel_size_option(options.pixel_size)
    check_precision(options.precision)
    if options.confidence is not None:
        if options.mode != "refine":
            raise IdgbrError("The confidence output is the refiner's: segment mode has none. Drop --confidence "
                             "or run 'idgbr refine'.", "confidence")
        if same_file(options.confidence, options.output):
            raise IdgbrError(f"--confidence and OUTPUT are the same file ({options.output}); give the confidence "
                             "its own file name, e.g. confidence.tif.", "confidence")


def _sampler_rules(card: ModelCard, options: RunOptions) -> tuple[int, int, float]:
    """Band, vocabulary and min confidence of the run: the options, else the card's defaults."""
    sampler = card.sampler
    band = sampler.band if options.band is None else options.band
    vocabulary = sampler.vocabulary if options.vocabulary is None else options.vocabulary
    min_confidence = (float(sampler.min_confidence) if options.min_confidence is None
                      else float(options.min_confidence))
    return band, vocabulary, min_confidence


def _notes_for_crs(src) -> list[str]:
    if src.crs is None:
        return ["INPUT has no CRS: the output keeps its pixel grid and has no CRS either."]
    return []


def _resolution(src, window, card: ModelCard, options: RunOptions):
    """The run's ResolutionPlan (idgbr.resolution) and its notes; raises IdgbrError for unusable sizes."""
    name = card.name or "the model"
    if options.pixel_size is not None:
        input_m, notes = float(options.pixel_size), [f"INPUT's pixel size given: {metres(options.pixel_size)} m."]
        if src.crs is not None:
            try:
                detected, _ = detect_pixel_size(src, window, card)
                notes[0] = notes[0][:-1] + f" (its georeference says {metres(detected)} m)."
            except IdgbrError:
                pass
    else:
        input_m, note = detect_pixel_size(src, window, card)
        notes = [note] if note else []
    plan = plan_resolution(input_m, card, name)
    return plan, notes + plan.notes


def _clean_folders(paths: list[Path]) -> list[str]:
    """Remove what interrupted runs left beside our outputs (raster.io.remove_stale_temps); notes saying so."""
    notes = []
    for folder in dict.fromkeys(p.parent if str(p.parent) else Path(".") for p in paths):
        removed = remove_stale_temps(folder)
        if removed:
            notes.append(f"Removed {len(removed)} temporary file{'s' if len(removed) != 1 else ''} that an "
                         f"interrupted run left in {folder}.")
    return notes


def _hold_for_tests(cancel: threading.Event | None) -> None:
    marker = os.environ.get(HOLD_ENV)
    if not marker:
        return
    Path(marker).touch()
    deadline = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < deadline:
        if cancel is not None and cancel.is_set():
            raise Cancelled("Cancelled; no output was written.")
        time.sleep(0.02)


def _grid(src, window: Window, plan, metres_per_pixel: float) -> VirtualGrid | None:
    """The virtual grid of a pass at ``metres_per_pixel`` (None: INPUT's own grid)."""
    if same_size(metres_per_pixel, plan.input_m):
        return None
    grid = VirtualGrid.at_factor(src, window, metres_per_pixel / plan.input_m)
    if grid.width == int(window.width) and grid.height == int(window.height):
        return None  # too small a change to move a single pixel
    return grid


def _staged_progress(progress, start: float, share: float):
    if progress is None:
        return None
    return lambda fraction, message: progress(start + share * fraction, message)


@dataclass
class PassCoarse:
    """The class-id map a refine pass reads: ``source``, open here, and what another process needs to open
    the same: the file and the grid it is on (``own``; None: INPUT's)."""

    source: CoarseSource | GridCoarse
    path: Path
    own: VirtualGrid | None = None


class Passes(Protocol):
    """Runs one pass of the tile engine over a whole grid (here: ``LocalPasses``; on a Dask cluster:
    ``idgbr.distributed.DaskPasses``)."""

    def run(self, grid: VirtualGrid | None, window: Window, coarse: PassCoarse | None, config: EngineConfig,
            writer: RowWriter, confidence_writer: RowWriter | None, progress) -> EngineStats:
        """``grid``: the pass's grid (None: INPUT's, with ``window`` the processed window of it)."""
        ...


class LocalPasses:
    """Each pass through one ``Engine`` in this process."""

    def __init__(self, bundle, src, bands: list[int], scaler, masked: bool, cancel: threading.Event | None) -> None:
        self.bundle, self.src, self.bands, self.scaler, self.masked, self.cancel = (
            bundle, src, bands, scaler, masked, cancel)

    def run(self, grid: VirtualGrid | None, window: Window, coarse: PassCoarse | None, config: EngineConfig,
            writer: RowWriter, confidence_writer: RowWriter | None, progress) -> EngineStats:
        engine = Engine(self.bundle, grid if grid is not None else self.src, window, self.bands, self.scaler,
                        self.masked, coarse.source if coarse is not None else None, config, writer, progress,
                        self.cancel, confidence_writer=confidence_writer)
        return engine.run()


def _process(bundle, src, window: Window, bands: list[int], masked: bool, coarse: CoarseSource | None,
             coarse_path: Path | None, config: EngineConfig, plan, writer: GeoTiffWriter,
             confidence_writer: GeoTiffWriter | None, progress, cancel, passes: Passes) -> EngineStats:
    """The passes of one run at the resolutions of ``plan``, written on INPUT's grid by the writers.

    Each pass runs the tile engine on its own grid: INPUT's, or a ``VirtualGrid`` (INPUT resampled window by
    window). When the coarse segmenter and the refiner work at different resolutions, the coarse pass first
    writes its class ids to a temporary GeoTIFF on its grid (removed at the end), which the refine pass reads
    on its own grid (nearest). Results on a virtual grid reach INPUT's grid through ``UpsampledWriter``."""
    refining = config.mode == "refine"
    final_grid = _grid(src, window, plan, plan.refine_m if refining else plan.coarse_m)
    staged = False
    if refining and coarse is None and final_grid is not None:
        coarse_grid = (_grid(src, window, plan, plan.coarse_m)
                       or VirtualGrid(src, window, int(window.width), int(window.height)))
        staged = (coarse_grid.width, coarse_grid.height) != (final_grid.width, final_grid.height)
    _hold_for_tests(cancel)
    with contextlib.ExitStack() as stack:
        source = PassCoarse(coarse, coarse_path) if coarse is not None and coarse_path is not None else None
        coarse_tiles = None
        final_start, final_share = 0.0, 1.0
        if staged:
            assert final_grid is not None  # staged only when the refiner works on a grid of its own
            # The coarse pass alone on its grid, into a temporary class-id map.
            c_src, c_window = coarse_grid, Window(0, 0, coarse_grid.width, coarse_grid.height)
            temp = stack.enter_context(GeoTiffWriter(
                writer.output, c_src, c_window, what="the coarse pass's temporary map", dtype="uint8",
                nodata=NODATA, description="coarse class id", tags={}))
            stack.callback(temp.abort)
            coarse_pixels = float(c_window.width) * float(c_window.height)
            refine_pixels = float(final_grid.width) * float(final_grid.height)
            share = coarse_pixels / (coarse_pixels + refine_pixels * max(1, config.steps))
            coarse_config = EngineConfig(**{**config.__dict__, "mode": "segment"})
            coarse_tiles = passes.run(c_src, c_window, None, coarse_config, temp, None,
                                      _staged_progress(progress, 0.0, share)).coarse_tiles
            temp.finish()
            own = CoarseSource(temp.tmp, c_src, bundle.card.num_classes)
            stack.callback(own.close)
            source = PassCoarse(GridCoarse(own, coarse_grid, final_grid), temp.tmp, coarse_grid)
            final_start, final_share = share, 1.0 - share
        elif coarse is not None and coarse_path is not None and final_grid is not None:
            # The user's map on INPUT's grid, read on the refiner's.
            source = PassCoarse(GridCoarse(coarse, None, final_grid), coarse_path)
        out: GeoTiffWriter | UpsampledWriter
        conf_out: GeoTiffWriter | UpsampledWriter | None
        if final_grid is None:
            f_window, out, conf_out = window, writer, confidence_writer
        else:
            f_window = Window(0, 0, final_grid.width, final_grid.height)
            out = UpsampledWriter(writer, final_grid, NODATA, bands, masked, count_classes=True)
            conf_out = (UpsampledWriter(confidence_writer, final_grid, CONFIDENCE_NODATA, bands, masked)
                        if confidence_writer is not None else None)
        stats = passes.run(final_grid, f_window, source, config, out, conf_out,
                           _staged_progress(progress, final_start, final_share))
        for upsampled in (out, conf_out):
            if isinstance(upsampled, UpsampledWriter):
                upsampled.flush()
    if coarse_tiles is not None:
        stats.coarse_tiles = coarse_tiles
    if final_grid is not None:
        assert isinstance(out, UpsampledWriter)  # the rows reached INPUT's grid through it
        hist = out.class_hist
        assert hist is not None  # count_classes=True
        stats.class_pixels = {i: int(n) for i, n in enumerate(hist[: bundle.card.num_classes]) if n}
        stats.nodata_pixels = int(hist[NODATA])
        # Counted on the refiner's grid; in INPUT pixels, about that times the pixels per working pixel.
        stats.changed_pixels = int(round(stats.changed_pixels * final_grid.sx * final_grid.sy))
    return stats


def run(options: RunOptions, progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None, cluster: Cluster | None = None) -> RunResult:
    """Run one job. Raises IdgbrError (message names the problem and the fix) or Cancelled; on any
    failure or cancel no OUTPUT is left behind. With ``cluster`` (``idgbr.distributed.Cluster``, started) the
    tiles run on its workers and this process writes the output: the same pixels as a run here."""
    started = time.perf_counter()
    _validate(options)
    input_path, output = Path(options.input), Path(options.output)
    coarse_path = Path(options.coarse) if options.coarse is not None else None
    confidence_path = Path(options.confidence) if options.confidence is not None else None
    others = [(name, path) for name, path in (("INPUT", input_path), ("the coarse map", coarse_path))
              if path is not None]
    with contextlib.ExitStack() as opened:
        opened.enter_context(gdal_env())
        with blame("input"):
            src = opened.enter_context(open_raster(input_path))
        with blame("output"):
            check_output(output, others)
        if confidence_path is not None:
            with blame("confidence"):
                check_output(confidence_path, others, what="the confidence output (--confidence)")
        notes = _clean_folders([p for p in (output, confidence_path) if p is not None])
        with blame("model"):  # device errors name "device" themselves
            # On a cluster this process needs only the card and the checks: the workers run the networks.
            bundle = load_bundle(options.model, options.device if cluster is None else "cpu")
        if cluster is None:
            device = bundle.device
            precision = resolve_precision(options.precision, device)
        else:
            device, precision = cluster.prepare(options, [p for p in (input_path, coarse_path) if p is not None],
                                                [p for p in (output, confidence_path) if p is not None])
            notes.append(cluster.note)
        card = bundle.card
        if options.mode == "segment" and bundle.coarse is None:
            raise IdgbrError("This model has no coarse segmenter, so it cannot segment; use refine with a coarse "
                             "map (--coarse) or another model.", "model")
        if options.mode == "refine" and bundle.refiner is None:
            raise IdgbrError("This model has no refiner; use 'segment' mode or another model.", "model")
        if options.mode == "refine" and coarse_path is None and bundle.coarse is None:
            raise IdgbrError("This model has no coarse segmenter: give a coarse class map with --coarse.", "coarse")
        with blame("bands"):
            bands = select_bands(src.count, card, options.bands)
        with blame("extent"):
            window, extent_note = extent_window(src, options.extent, options.extent_crs)
        notes += _notes_for_crs(src)
        if extent_note:
            notes.append(extent_note)
        # Unusable sizes: the fix is PIXEL_SIZE when one was given or is offered, else finer imagery (INPUT).
        with blame("pixel_size" if options.pixel_size is not None else "input"):
            plan, resolution_notes = _resolution(src, window, card, options)
        notes += resolution_notes
        model_coarse = coarse_path is None
        coarse_m = plan.coarse_m if model_coarse else 0.0
        refine_m = plan.refine_m if options.mode == "refine" else 0.0
        notes.append(plan.summary(options.mode, segmented=model_coarse))
        notes.append(precision_note(options.precision, precision, device))
        scaler = make_scaler(src, bands)
        if scaler.note:
            notes.append(scaler.note)
        for note in notes:
            log.info(note)

        tile = options.tile or card.tile_size
        overlap = card.overlap if options.overlap is None else options.overlap
        if overlap * 2 > tile:
            raise IdgbrError(f"--overlap {overlap} is more than half the tile size {tile}; give an overlap "
                             f"from 0 to {tile // 2}.", "overlap")
        steps = card.sampler.steps if options.steps is None else options.steps
        band, vocabulary, min_confidence = _sampler_rules(card, options)
        config = EngineConfig(mode=options.mode, tile=tile, overlap=overlap,
                              batch=default_batch(device.type), steps=steps, seed=options.seed,
                              band=band, vocabulary=vocabulary, min_confidence=min_confidence,
                              max_block_width=block_width(tile), precision=precision, io_thread=IO_THREAD)
        coarse = None
        try:
            if coarse_path is not None:
                with blame("coarse"):
                    coarse = CoarseSource(coarse_path, src, card.num_classes)
                    coverage_note = coarse.coverage(window)
                    coarse.validate(window)
                if coarse.resampled:
                    notes.append(f"The coarse map {coarse_path.name} is on another grid: resampled (nearest) to "
                                 + (f"the refiner's {metres(plan.refine_m)} m grid over INPUT."
                                    if plan.refine_resampled else "INPUT's grid."))
                    log.info(notes[-1])
                if coverage_note:
                    notes.append(coverage_note)
                    log.info(coverage_note)
            tags = {"IDGBR_MODEL": card.name, "IDGBR_MODE": options.mode,
                    "IDGBR_STEPS": str(steps if options.mode == "refine" else 0), "IDGBR_SEED": str(options.seed),
                    "IDGBR_VERSION": __version__, "IDGBR_INPUT": input_path.name}
            if options.mode == "refine":
                tags.update(IDGBR_BAND=str(band), IDGBR_VOCABULARY=str(vocabulary),
                            IDGBR_MIN_CONFIDENCE=f"{min_confidence:g}")
            tags.update(IDGBR_INPUT_PIXEL_M=f"{plan.input_m:g}", IDGBR_COARSE_PIXEL_M=f"{coarse_m:g}",
                        IDGBR_REFINE_PIXEL_M=f"{refine_m:g}", IDGBR_PRECISION=precision)
            with contextlib.ExitStack() as outputs:
                writer = outputs.enter_context(OutputWriter(output, src, window, card.class_dicts(), tags))
                confidence_writer = None
                if confidence_path is not None:
                    confidence_writer = outputs.enter_context(ConfidenceWriter(confidence_path, src, window, tags))
                masked = has_masks(src, bands)
                passes: Passes = (LocalPasses(bundle, src, bands, scaler, masked, cancel) if cluster is None else
                                  cluster.passes(input_path, window, bands, scaler, masked, options.model, device,
                                                 card.size_multiple, cancel))
                stats = _process(bundle, src, window, bands, masked, coarse, coarse_path, config, plan, writer,
                                 confidence_writer, progress, cancel, passes)
                # Both or neither: all verified, then swapped in together (or the old files stay).
                commit_all([w for w in (writer, confidence_writer) if w is not None])
        finally:
            if coarse is not None:
                coarse.close()
    result = RunResult(
        output=output, mode=options.mode, model=card.name, device=str(device),
        width=int(window.width), height=int(window.height), seconds=time.perf_counter() - started,
        tiles=stats.tiles if options.mode == "refine" else stats.coarse_tiles, tiles_refined=stats.tiles_refined,
        steps=steps if options.mode == "refine" else 0, classes=card.class_dicts(),
        class_pixels=stats.class_pixels, nodata_pixels=stats.nodata_pixels, notes=notes,
        coarse_tiles=stats.coarse_tiles, tile_shape=stats.tile_shape, input_pixel_m=plan.input_m,
        coarse_pixel_m=coarse_m, refine_pixel_m=refine_m, precision=precision)
    if options.mode == "refine":
        result.band, result.vocabulary, result.min_confidence = band, vocabulary, min_confidence
        result.changed_pixels = stats.changed_pixels
        result.confidence = confidence_path
    if options.mode == "refine":
        log.info(f"Refined {result.tiles_refined} of {result.tiles} tiles ({100 * result.refined_share:.0f} %); "
                 "the others had no class boundary.")
    return result
