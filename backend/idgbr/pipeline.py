"""One run of the product: INPUT raster -> class-id GeoTIFF (and, on request, the refiner's confidence),
through the coarse segmenter and (in refine mode) the diffusion refiner. Used by the command line, the
service and the demo."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import Cancelled, IdgbrError
from .model_bundle import load_bundle
from .raster.bands import make_scaler, select_bands
from .raster.engine import Engine, EngineConfig
from .raster.io import (
    CoarseSource,
    ConfidenceWriter,
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

log = logging.getLogger("idgbr")

MODES = ("refine", "segment")
MAX_TILE = 4096
MAX_RULE_PX = 1024  # largest band / vocabulary radius
BLOCK_WIDTH = 8192  # column block width: bounds buffer memory for very wide rasters
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
    model: Path | None = None  # None -> bundled dubai5
    steps: int | None = None  # None -> card["sampler"]["steps"]
    device: str = "auto"  # auto | cpu | cuda | mps
    bands: list[int] | None = None  # 1-based input bands in the model's band order
    extent: tuple[float, float, float, float] | None = None  # xmin, ymin, xmax, ymax
    extent_crs: str | None = None  # e.g. "EPSG:4326"; None -> the raster's CRS
    tile: int | None = None
    overlap: int | None = None
    band: int | None = None  # refine: change only within this many px of a coarse boundary; -1 off; None card
    vocabulary: int | None = None  # refine: only classes the coarse map has within this many px; -1 off; None card
    min_confidence: float | None = None  # refine: keep a change only at this probability (0 off); None card
    confidence: Path | None = None  # refine: also write the float32 confidence GeoTIFF here
    seed: int = 0


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


def default_batch(device_type: str) -> int:
    # CPU gains nothing from batches (threads already fill the cores), and one tile per batch keeps memory
    # and the wait for a cancel (checked between batches) small.
    return 8 if device_type == "cuda" else 1


def _check_int(name: str, value: int | None, low: int, high: int, flag: str, hint: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise IdgbrError(f"{name} must be a whole number from {low} to {high}{hint} (got {value!r}); fix {flag}.")


def _check_probability(name: str, value: float | None, flag: str, hint: str = "") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise IdgbrError(f"{name} must be a number from 0 to 1{hint} (got {value!r}); fix {flag}.")


def _validate(options: RunOptions) -> None:
    if options.mode not in MODES:
        raise IdgbrError(f"Unknown mode {options.mode!r}: use 'refine' or 'segment'.")
    if options.mode == "segment" and options.coarse is not None:
        raise IdgbrError("A coarse map is only used by refine; drop --coarse or run 'idgbr refine'.")
    _check_int("steps", options.steps, 1, 100, "--steps")
    _check_int("tile", options.tile, 16, MAX_TILE, "--tile")
    _check_int("overlap", options.overlap, 0, MAX_TILE // 2, "--overlap")
    _check_int("band", options.band, -1, MAX_RULE_PX, "--band", " (-1 or 'off': rule off)")
    _check_int("vocabulary", options.vocabulary, -1, MAX_RULE_PX, "--vocabulary", " (-1 or 'off': rule off)")
    _check_probability("min confidence", options.min_confidence, "--min-confidence", " (0: gate off)")
    _check_int("seed", options.seed, 0, 2**31 - 1, "--seed")
    if options.confidence is not None:
        if options.mode != "refine":
            raise IdgbrError("The confidence output is the refiner's: segment mode has none. Drop --confidence "
                             "or run 'idgbr refine'.")
        if same_file(options.confidence, options.output):
            raise IdgbrError(f"--confidence and OUTPUT are the same file ({options.output}); give the confidence "
                             "its own file name, e.g. confidence.tif.")


def _sampler_rules(card: dict, options: RunOptions) -> tuple[int, int, float]:
    """Band, vocabulary and min confidence of the run: the options, else the card's defaults (else off)."""
    sampler = card.get("sampler", {})
    band = int(sampler.get("band", -1)) if options.band is None else options.band
    vocabulary = int(sampler.get("vocabulary", -1)) if options.vocabulary is None else options.vocabulary
    min_confidence = (float(sampler.get("min_confidence", 0.0)) if options.min_confidence is None
                      else float(options.min_confidence))
    return band, vocabulary, min_confidence


def _notes_for_crs(src, card: dict) -> list[str]:
    notes = []
    if src.crs is None:
        notes.append("INPUT has no CRS: the output keeps its pixel grid and has no CRS either.")
        return notes
    if src.crs.is_geographic:
        lat = (src.bounds.top + src.bounds.bottom) / 2
        metres = abs(src.transform.a) * 111_320 * max(0.01, math.cos(math.radians(lat)))
        unit = f"{src.crs.to_string()} (geographic, about {metres:.2g} m per pixel)"
    else:
        metres = abs(src.transform.a) * (src.crs.linear_units_factor[1] if src.crs.linear_units_factor else 1)
        unit = f"{src.crs.to_string()} ({metres:.2g} m per pixel)"
    nominal = card.get("pixel_size_m")
    if nominal and (metres > 2.5 * nominal or metres < nominal / 2.5):
        notes.append(f"INPUT is in {unit}; the model was trained at about {nominal:g} m per pixel, so results "
                     "may be poor. Resample the raster closer to that resolution for best results.")
    return notes


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


def run(options: RunOptions, progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None) -> RunResult:
    """Run one job. Raises IdgbrError (message names the problem and the fix) or Cancelled; on any
    failure or cancel no OUTPUT is left behind."""
    started = time.perf_counter()
    _validate(options)
    input_path, output = Path(options.input), Path(options.output)
    coarse_path = Path(options.coarse) if options.coarse is not None else None
    confidence_path = Path(options.confidence) if options.confidence is not None else None
    with gdal_env(), open_raster(input_path) as src:
        check_output(output, [("INPUT", input_path), ("the coarse map", coarse_path)])
        if confidence_path is not None:
            check_output(confidence_path, [("INPUT", input_path), ("the coarse map", coarse_path)],
                         what="the confidence output (--confidence)")
        notes = _clean_folders([p for p in (output, confidence_path) if p is not None])
        bundle = load_bundle(options.model, options.device)
        card = bundle.card
        if options.mode == "segment" and bundle.coarse is None:
            raise IdgbrError("This model has no coarse segmenter, so it cannot segment; use refine with a coarse "
                             "map (--coarse) or another model.")
        if options.mode == "refine" and bundle.refiner is None:
            raise IdgbrError("This model has no refiner; use 'segment' mode or another model.")
        if options.mode == "refine" and coarse_path is None and bundle.coarse is None:
            raise IdgbrError("This model has no coarse segmenter: give a coarse class map with --coarse.")
        bands = select_bands(src.count, card, options.bands)
        window, extent_note = extent_window(src, options.extent, options.extent_crs)
        notes += _notes_for_crs(src, card)
        if extent_note:
            notes.append(extent_note)
        scaler = make_scaler(src, bands)
        if scaler.note:
            notes.append(scaler.note)
        for note in notes:
            log.info(note)

        tile = options.tile or int(card.get("tile_size", 512))
        overlap = int(card.get("overlap", 64)) if options.overlap is None else options.overlap
        if overlap * 2 > tile:
            raise IdgbrError(f"--overlap {overlap} is more than half the tile size {tile}; give an overlap "
                             f"from 0 to {tile // 2}.")
        sampler = card.get("sampler", {})
        steps = int(sampler.get("steps", 4)) if options.steps is None else options.steps
        band, vocabulary, min_confidence = _sampler_rules(card, options)
        config = EngineConfig(mode=options.mode, tile=tile, overlap=overlap,
                              batch=default_batch(bundle.device.type), steps=steps, seed=options.seed,
                              band=band, vocabulary=vocabulary, min_confidence=min_confidence,
                              max_block_width=BLOCK_WIDTH)
        coarse = None
        try:
            if coarse_path is not None:
                coarse = CoarseSource(coarse_path, src, int(card["num_classes"]))
                if coarse.resampled:
                    notes.append(f"The coarse map {coarse_path.name} is on another grid: resampled (nearest) to "
                                 "INPUT's grid.")
                    log.info(notes[-1])
                coverage_note = coarse.coverage(window)
                if coverage_note:
                    notes.append(coverage_note)
                    log.info(coverage_note)
                coarse.validate(window)
            tags = {"IDGBR_MODEL": str(card.get("name", "")), "IDGBR_MODE": options.mode,
                    "IDGBR_STEPS": str(steps if options.mode == "refine" else 0), "IDGBR_SEED": str(options.seed),
                    "IDGBR_VERSION": __version__, "IDGBR_INPUT": input_path.name}
            if options.mode == "refine":
                tags.update(IDGBR_BAND=str(band), IDGBR_VOCABULARY=str(vocabulary),
                            IDGBR_MIN_CONFIDENCE=f"{min_confidence:g}")
            with contextlib.ExitStack() as outputs:
                writer = outputs.enter_context(OutputWriter(output, src, window, list(card["classes"]), tags))
                confidence_writer = None
                if confidence_path is not None:
                    confidence_writer = outputs.enter_context(ConfidenceWriter(confidence_path, src, window, tags))
                engine = Engine(bundle, src, window, bands, scaler, has_masks(src, bands), coarse, config,
                                writer, progress, cancel, confidence_writer=confidence_writer)
                _hold_for_tests(cancel)
                stats = engine.run()
                # Both or neither: all verified, then swapped in together (or the old files stay).
                commit_all([w for w in (writer, confidence_writer) if w is not None])
        finally:
            if coarse is not None:
                coarse.close()
    result = RunResult(
        output=output, mode=options.mode, model=str(card.get("name", "")), device=str(bundle.device),
        width=int(window.width), height=int(window.height), seconds=time.perf_counter() - started,
        tiles=stats.tiles if options.mode == "refine" else stats.coarse_tiles, tiles_refined=stats.tiles_refined,
        steps=steps if options.mode == "refine" else 0, classes=list(card["classes"]),
        class_pixels=stats.class_pixels, nodata_pixels=stats.nodata_pixels, notes=notes,
        coarse_tiles=stats.coarse_tiles, tile_shape=stats.tile_shape)
    if options.mode == "refine":
        result.band, result.vocabulary, result.min_confidence = band, vocabulary, min_confidence
        result.changed_pixels = stats.changed_pixels
        result.confidence = confidence_path
    if options.mode == "refine":
        log.info(f"Refined {result.tiles_refined} of {result.tiles} tiles ({100 * result.refined_share:.0f} %); "
                 "the others had no class boundary.")
    return result
