"""The `idgbr` command: refine, segment and bench here; train, evaluate, info and serve are added by their
own modules through ``register_cli(subparsers)``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, TextIO

from . import __version__
from .errors import Cancelled, IdgbrError
from .limits import DEVICES

log = logging.getLogger("idgbr")

# Modules that add their own subcommands (ARCHITECTURE.md, "Command line").
SUBCOMMAND_MODULES = ("idgbr.batch", "idgbr.train", "idgbr.evaluate", "idgbr.checkpoint", "idgbr.service.app",
                      "idgbr.bench")

VALUE_OPTIONS = ("--extent", "--pixel-size")  # options whose value may start with a minus sign
EXIT_ERROR = 1
EXIT_CANCELLED = 130  # the shell's convention for Ctrl-C
STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # handled like Ctrl-C during a run (Windows has no SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a run: unwinds like Ctrl-C, so the temporary outputs are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_like_ctrl_c() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise ``Stopped`` in the main thread, as SIGINT raises
    KeyboardInterrupt; repeats of them are ignored while the run cleans up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    numbers = [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]

    def stop(signum: int, _frame: object) -> None:
        for number in numbers:
            signal.signal(number, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {number: signal.signal(number, stop) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class TerminalProgress:
    """A one-line progress bar redrawn in place (tiles, MP/s, ETA come in the engine's message)."""

    def __init__(self, stream: TextIO, width: int = 28, min_interval: float = 0.2) -> None:
        self.stream = stream
        self.width = width
        self.min_interval = min_interval
        self.last = 0.0
        self.drawn = False

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self.last < self.min_interval:
            return
        self.last = now
        filled = int(round(self.width * max(0.0, min(1.0, fraction))))
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{100 * fraction:5.1f}% [{bar}] {message}\033[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _card_sampler() -> dict:
    """The bundled default model's sampler section, for the defaults shown in --help ({} when unreadable)."""
    try:
        from .checkpoint import read_card
        from .limits import DEFAULT_MODEL
        from .model_bundle import default_model_path

        return read_card(default_model_path(DEFAULT_MODEL)).sampler.to_dict()
    except Exception:  # noqa: BLE001 - help must print even without a usable bundled model
        return {}


def _default_text(sampler: dict, key: str, unit: str = "") -> str:
    """"default: the model card's; dubai5: 8 px" ('off' for a rule the card switches off)."""
    try:
        value = float(sampler[key])
    except (KeyError, TypeError, ValueError):
        return "default: the model card's"
    off = value <= 0 if key == "min_confidence" else value < 0
    return f"default: the model card's; dubai5: {'off' if off else f'{value:g}{unit}'}"


def parse_rule(text: str | None, flag: str) -> int | None:
    """A --band / --vocabulary value: PX (a whole number of pixels) or 'off' (-1)."""
    if text is None:
        return None
    value = text.strip().lower()
    if value in ("off", "-1", "none"):
        return -1
    try:
        return int(value)
    except ValueError:
        raise IdgbrError(f"{flag} must be a whole number of pixels or 'off' (got {text!r}).") from None


def parse_probability(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise IdgbrError(f"{flag} must be a number from 0 to 1 (got {text!r}); 0 switches the gate off.") from None
    return value


def parse_pixel_size(text: str | None) -> float | None:
    """A --pixel-size value in metres (checked for sign and size by the pipeline)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise IdgbrError(f"--pixel-size must be a number of metres such as 0.05 (got {text!r}).") from None


def _add_run_arguments(parser: argparse.ArgumentParser, refine: bool) -> None:
    parser.add_argument("input", type=Path, metavar="INPUT", help="input raster (GeoTIFF or any GDAL raster)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT",
                        help="output GeoTIFF of class ids (uint8, nodata 255, colour table); written to a "
                             "temporary file and renamed at the end")
    if refine:
        parser.add_argument("--coarse", type=Path, metavar="RASTER",
                            help="class-id raster from any model to refine instead of the bundled coarse "
                                 "segmenter (resampled nearest to INPUT's grid when its grid differs)")
    add_model_arguments(parser, refine)
    parser.add_argument("--extent", metavar="XMIN,YMIN,XMAX,YMAX",
                        help="process only this area, snapped outward to the pixel grid")
    parser.add_argument("--extent-crs", metavar="CRS",
                        help="CRS of --extent, e.g. EPSG:4326 (default: the raster's CRS)")
    if refine:
        parser.add_argument("--confidence", type=Path, metavar="PATH",
                            help="also write a float GeoTIFF on the input grid: the refiner's probability of each "
                                 "written class (0..1; -1 where OUTPUT is nodata)")
        # Deprecated spelling of --band (its 0 meant "no band", which is --band off now).
        parser.add_argument("--guard-band", type=int, metavar="PX", help=argparse.SUPPRESS)
    else:
        # Accepted only to explain that segment writes no confidence (the pipeline's error), not to fail on usage.
        parser.add_argument("--confidence", type=Path, help=argparse.SUPPRESS)
    add_cluster_arguments(parser, "the tiles of INPUT run on a Dask cluster and this computer writes OUTPUT, "
                                  "the same pixels as a run here")
    remote = parser.add_argument_group(
        "remote backend", "run on an 'idgbr serve' on another computer (a GPU server): INPUT and --coarse are "
                          "uploaded, the results downloaded; same options, same pixels as here")
    remote.add_argument("--backend", metavar="URL",
                        help="the service's address, e.g. https://gpu-server:8443 (its --tls-cert and --tls-key make "
                             "it HTTPS)")
    remote.add_argument("--token-file", type=Path, metavar="PATH",
                        help="with --backend: a copy of the service's token file (its --token-file)")
    remote.add_argument("--ca-cert", type=Path, metavar="PEM",
                        help="with --backend: trust this certificate, e.g. a copy of the service's self-signed "
                             "--tls-cert (default: the system's certificate authorities)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no log lines")


def add_cluster_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """--workers, --scheduler and --threads (``idgbr.distributed.Cluster``)."""
    group = parser.add_argument_group("Dask cluster", f"{what} (needs pip install 'idgbr[distributed]')")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="start a local Dask cluster of N worker processes for this run (stopped at its end)")
    where.add_argument("--scheduler", metavar="tcp://HOST:8786",
                       help="use the running Dask cluster of this scheduler; its workers need the IDGBR backend "
                            "(same version) and must see the rasters, the model and the output folder at the same "
                            "paths as this computer")
    group.add_argument("--threads", type=int, metavar="N",
                       help="torch threads per worker task (default: with --workers the cores divided by N; with "
                            "--scheduler each worker's cores divided by its Dask threads)")


def add_model_arguments(parser: argparse.ArgumentParser, refine: bool) -> None:
    """The options of how a raster is processed (model, device, tiles, resolution, refiner rules), shared by
    refine, segment and batch."""
    parser.add_argument("--model", metavar="PATH",
                        help="model file (.safetensors) or bundled model name (dubai5, roads2, buildings2); "
                             "default dubai5")
    if refine:
        parser.add_argument("--steps", type=int, metavar="N",
                            help="diffusion sampling steps (default: the model card's)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where to run the model (default auto: CUDA, then MPS, then CPU)")
    parser.add_argument("--precision", metavar="auto|fp32|bf16|fp16",
                        help="number format of the networks: auto takes bf16 on CPUs with AMX or AVX512-BF16 "
                             "(faster; changes a few pixels), bf16 or fp16 on CUDA GPUs, else fp32; fp16 is for "
                             "GPUs only. The refiner's rules, blending and the confidence gate always work in fp32 "
                             "(default: auto)")
    parser.add_argument("--bands", metavar="1,2,3",
                        help="input band numbers (1-based) in the model's band order (default: the card's)")
    parser.add_argument("--tile", type=int, metavar="N",
                        help="largest tile size in pixels; tiles are spread evenly and shrink to fit, rounded to "
                             "the model's size multiple (default: the model card's)")
    parser.add_argument("--overlap", type=int, metavar="N",
                        help="overlap between tiles in pixels, blended (default: the model card's)")
    parser.add_argument("--pixel-size", metavar="METRES",
                        help="INPUT's pixel size in metres, overriding its georeference (rasters without a CRS, "
                             "wrong metadata). Outside the model's range (see 'idgbr info') the model works on a "
                             "resampled copy and the result is written on INPUT's grid (default: from the CRS; "
                             "without a CRS the model's working resolution)")
    if refine:
        sampler = _card_sampler()
        parser.add_argument("--band", metavar="PX|off",
                            help="the refiner may change a pixel only within PX of a coarse class boundary; 0 keeps "
                                 f"the coarse map, off lifts the rule ({_default_text(sampler, 'band', ' px')})")
        parser.add_argument("--vocabulary", metavar="PX|off",
                            help="a pixel may only take a class the coarse map has within PX of it, so regions are "
                                 "never invented or erased; off lifts the rule "
                                 f"({_default_text(sampler, 'vocabulary', ' px')})")
        parser.add_argument("--min-confidence", metavar="P",
                            help="a pixel takes the refiner's class only where the refiner prefers it over the "
                                 "coarse class with a probability of at least P (the two weighed against each "
                                 "other), else it keeps the coarse class; 0.5 or less lets every preferred change "
                                 "through, 1 keeps the coarse map "
                                 f"({_default_text(sampler, 'min_confidence')})")
        parser.add_argument("--seed", type=int, default=0, metavar="N",
                            help="seed of the diffusion noise; results are reproducible per seed (default 0)")


def model_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``RunOptions`` fields of ``add_model_arguments``' options; one-line IdgbrErrors for bad values."""
    from .raster.bands import parse_bands

    # Parsed here rather than by argparse so a bad value gets the same one-line error as other bad inputs.
    band = parse_rule(getattr(args, "band", None), "--band")
    guard_band = getattr(args, "guard_band", None)
    if guard_band is not None:
        log.warning("--guard-band is deprecated: use --band (--guard-band 0 is --band off).")
        if band is None:
            band = -1 if guard_band == 0 else guard_band
    return dict(
        model=args.model, steps=getattr(args, "steps", None), device=args.device,
        bands=parse_bands(args.bands) if args.bands else None, tile=args.tile, overlap=args.overlap, band=band,
        vocabulary=parse_rule(getattr(args, "vocabulary", None), "--vocabulary"),
        min_confidence=parse_probability(getattr(args, "min_confidence", None), "--min-confidence"),
        seed=getattr(args, "seed", 0), pixel_size=parse_pixel_size(args.pixel_size), precision=args.precision)


def cluster_from(args: argparse.Namespace) -> Any:
    """The ``idgbr.distributed.Cluster`` that --workers or --scheduler ask for (not started), or None."""
    if args.workers is None and args.scheduler is None:
        if args.threads is not None:
            raise IdgbrError("--threads applies to Dask workers: add --workers N or --scheduler ADDRESS, or leave "
                             "--threads out.")
        return None
    from .distributed import Cluster

    return Cluster(workers=args.workers, scheduler=args.scheduler, threads=args.threads)


def _run_command(args: argparse.Namespace) -> int:
    from .raster.io import parse_extent

    fields = dict(
        input=args.input, output=args.output, mode=args.command, coarse=getattr(args, "coarse", None),
        extent=parse_extent(args.extent) if args.extent else None, extent_crs=args.extent_crs,
        confidence=getattr(args, "confidence", None), **model_fields(args))
    cluster = cluster_from(args)
    if cluster is not None and args.backend is not None:
        raise IdgbrError("--backend runs the job on a remote service and --workers / --scheduler on a Dask cluster: "
                         "choose one.")
    if args.backend is None:
        for flag, value in (("--token-file", args.token_file), ("--ca-cert", args.ca_cert)):
            if value is not None:
                raise IdgbrError(f"{flag} only applies with --backend URL: add --backend, or leave {flag} out.")
    elif args.token_file is None:
        raise IdgbrError("--backend needs --token-file: a copy of the service's token file (the file its "
                         "--token-file names).")
    bar = None if args.quiet or not sys.stderr.isatty() else TerminalProgress(sys.stderr)
    result: Any
    try:
        with stop_signals_like_ctrl_c():
            if args.backend is not None:
                from . import remote

                result = remote.run(fields, url=args.backend, token_file=args.token_file, ca_cert=args.ca_cert,
                                    progress=bar)
            else:
                from .pipeline import RunOptions, run

                with cluster if cluster is not None else contextlib.nullcontext():
                    result = run(RunOptions(**fields), progress=bar, cluster=cluster)
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        _print_summary(result)
    return 0


def _print_summary(result: Any) -> None:
    """The lines after a run: a local RunResult, or a remote run's result with the same attributes."""
    from .checkpoint import rules_text

    rate = result.seconds / result.megapixels if result.megapixels else 0.0
    done = (f"refined {result.tiles_refined} of {result.tiles} tiles ({100 * result.refined_share:.0f} %)"
            if result.mode == "refine" else f"{result.tiles} tiles")
    print(f"Wrote {result.output}: {result.width} x {result.height} px, {done}, {result.seconds:.1f} s "
          f"({rate:.2f} s/MP) on {result.device} ({result.precision}).")
    if result.mode == "refine":
        valid = result.width * result.height - result.nodata_pixels
        share = 100 * result.changed_pixels / valid if valid else 0.0
        print(f"Changed {result.changed_pixels} px ({share:.2f} %) of the coarse map; rules: "
              f"{rules_text(result.band, result.vocabulary, result.min_confidence)}.")
    if result.confidence is not None:
        print(f"Wrote {result.confidence}: the refiner's confidence (float32, 0..1).")


def _register_subcommands(subparsers: argparse._SubParsersAction) -> None:
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idgbr",
        description="Segment aerial rasters and refine class boundaries with a small diffusion model (IDGBR).")
    parser.add_argument("--version", action="version", version=f"idgbr {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    refine = subparsers.add_parser(
        "refine", help="coarse segmentation (or --coarse) then diffusion refinement of class boundaries",
        description="Segment INPUT with the model's coarse segmenter (or take --coarse from any other model), "
                    "then refine the class boundaries with the diffusion refiner. Writes a GeoTIFF of class "
                    "ids on INPUT's grid.")
    _add_run_arguments(refine, refine=True)
    refine.set_defaults(func=_run_command)
    segment = subparsers.add_parser(
        "segment", help="the coarse segmenter alone",
        description="Segment INPUT with the model's coarse segmenter only (no refinement).")
    _add_run_arguments(segment, refine=False)
    segment.set_defaults(func=_run_command)
    _register_subcommands(subparsers)
    return parser


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("idgbr: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


def _join_negative_values(argv: list[str]) -> list[str]:
    """argparse takes "--extent -101.7,40.1,..." for two options; glue such values to their option."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"^-[\d.]", argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Console script entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    _setup_logging(bool(getattr(args, "quiet", False)))
    try:
        return int(args.func(args) or 0)
    except Cancelled:
        print("idgbr: cancelled; no output was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except KeyboardInterrupt as exc:
        if isinstance(exc, Stopped):
            print(f"\nidgbr: stopped by {signal.Signals(exc.signum).name}; no output was written.", file=sys.stderr)
            status = 128 + exc.signum  # the shell's convention for a process ended by a signal
        else:
            print("\nidgbr: interrupted; no output was written.", file=sys.stderr)
            status = EXIT_CANCELLED
        if argv is None:
            # Run as the command: the temporary output is already removed, and tearing down torch at
            # interpreter exit takes over a second, so leave now to stop within the promised 2 s.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status
    except IdgbrError as exc:
        print(f"idgbr: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
