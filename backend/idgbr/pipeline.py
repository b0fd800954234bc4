"""One run of the product: INPUT raster -> class-id GeoTIFF, through the coarse segmenter and (in refine
mode) the diffusion refiner. Used by the command line, the service and the demo."""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import IdgbrError
from .model_bundle import load_bundle
from .raster.bands import make_scaler, select_bands
from .raster.engine import Engine, EngineConfig
from .raster.io import CoarseSource, OutputWriter, check_output, extent_window, gdal_env, has_masks, open_raster

log = logging.getLogger("idgbr")

MODES = ("refine", "segment")
MAX_TILE = 4096
BLOCK_WIDTH = 8192  # column block width: bounds buffer memory for very wide rasters


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
    guard_band: int | None = None
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

    @property
    def megapixels(self) -> float:
        return self.width * self.height / 1e6

    @property
    def refined_share(self) -> float:
        return self.tiles_refined / self.tiles if self.tiles else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["output"] = str(self.output)
        data["class_pixels"] = {str(k): v for k, v in self.class_pixels.items()}
        data["megapixels"] = self.megapixels
        data["refined_share"] = self.refined_share
        return data


def default_batch(device_type: str) -> int:
    # CPU gains nothing from batches (threads already fill the cores), and one tile per batch keeps memory
    # and the wait for a cancel (checked between batches) small.
    return 8 if device_type == "cuda" else 1


def _check_int(name: str, value: int | None, low: int, high: int, flag: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise IdgbrError(f"{name} must be a whole number from {low} to {high} (got {value!r}); fix {flag}.")


def _validate(options: RunOptions) -> None:
    if options.mode not in MODES:
        raise IdgbrError(f"Unknown mode {options.mode!r}: use 'refine' or 'segment'.")
    if options.mode == "segment" and options.coarse is not None:
        raise IdgbrError("A coarse map is only used by refine; drop --coarse or run 'idgbr refine'.")
    _check_int("steps", options.steps, 1, 100, "--steps")
    _check_int("tile", options.tile, 16, MAX_TILE, "--tile")
    _check_int("overlap", options.overlap, 0, MAX_TILE // 2, "--overlap")
    _check_int("guard band", options.guard_band, 0, 1024, "--guard-band")
    _check_int("seed", options.seed, 0, 2**31 - 1, "--seed")


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


def run(options: RunOptions, progress: Callable[[float, str], None] | None = None,
        cancel: threading.Event | None = None) -> RunResult:
    """Run one job. Raises IdgbrError (message names the problem and the fix) or Cancelled; on any
    failure or cancel no OUTPUT is left behind."""
    started = time.perf_counter()
    _validate(options)
    input_path, output = Path(options.input), Path(options.output)
    coarse_path = Path(options.coarse) if options.coarse is not None else None
    with gdal_env(), open_raster(input_path) as src:
        check_output(output, [("INPUT", input_path), ("the coarse map", coarse_path)])
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
        window = extent_window(src, options.extent, options.extent_crs)
        notes = _notes_for_crs(src, card)
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
        guard_band = int(sampler.get("guard_band", 0)) if options.guard_band is None else options.guard_band
        config = EngineConfig(mode=options.mode, tile=tile, overlap=overlap,
                              batch=default_batch(bundle.device.type), steps=steps, seed=options.seed,
                              guard_band=guard_band, max_block_width=BLOCK_WIDTH)
        coarse = None
        try:
            if coarse_path is not None:
                coarse = CoarseSource(coarse_path, src, int(card["num_classes"]))
                if coarse.resampled:
                    notes.append(f"The coarse map {coarse_path.name} is on another grid: resampled (nearest) to "
                                 "INPUT's grid.")
                    log.info(notes[-1])
                coarse.validate(window)
            tags = {"IDGBR_MODEL": str(card.get("name", "")), "IDGBR_MODE": options.mode,
                    "IDGBR_STEPS": str(steps if options.mode == "refine" else 0), "IDGBR_SEED": str(options.seed),
                    "IDGBR_VERSION": __version__, "IDGBR_INPUT": input_path.name}
            with OutputWriter(output, src, window, list(card["classes"]), tags) as writer:
                engine = Engine(bundle, src, window, bands, scaler, has_masks(src, bands), coarse, config,
                                writer, progress, cancel)
                stats = engine.run()
                writer.commit()
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
        log.info(f"Refined {result.tiles_refined} of {result.tiles} tiles ({100 * result.refined_share:.0f} %); "
                 "the others had no class boundary.")
    return result
