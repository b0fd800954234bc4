"""`idgbr bench`: speed and memory of the full pipeline on a real mosaic and on a 20,000 x 20,000 px raster,
at each precision asked for (fp32 and the device's half type side by side by default).

Each measured run happens in its own child process, which reports its wall time and its own peak resident
memory, so one run's allocations never hide in another's figure. The rasters are built in a temporary
folder: a >= 16 MP mosaic of real Dubai tiles, and a large raster made of tiled copies of that mosaic,
written block by block (it is never held in memory either).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .card import ModelCard
from .errors import IdgbrError
from .limits import DEVICES

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "datasets" / "dubai-aerial"
TARGET_S_PER_MP = 2.0
TARGET_RSS_GB = 1.5
# The speed bar against a plain segmenter: segment + refine in at most this share of a plain ResNet-34 U-Net's
# time, at most this many s/MP on two cores, and the half type this much faster with this share of pixels alike.
TARGET_PLAIN_RATIO = 0.5
TARGET_FAST_S_PER_MP = 0.5
TARGET_HALF_SPEEDUP = 1.8
TARGET_HALF_AGREEMENT = 0.995
PLAIN_MODE = "plain"  # rows of the reference segmenter (bench_reference)
PLAIN_LABEL = "mosaic, plain ResNet-34 U-Net (reference)"
KEEP_MARKER = "<!-- bench: sections below are kept when the report is rewritten -->"
FINE_PIXEL_M = 0.05  # the drone-mosaic rows: the same rasters given --pixel-size 0.05
FINE_LABEL = "{where} at 5 cm (--pixel-size 0.05)"
CELL = 1024  # mosaic cells: whole 1024 px crops of real images, so most edges in the mosaic are real ones
DEFAULT_PRECISIONS = "fp32,auto"  # each raster at each of these, one after the other


# ----------------------------------------------------------------------------------------- rasters

def build_mosaic(data: Path, path: Path, size: int) -> Path:
    """A size x size px 3-band GeoTIFF (placeholder georeference EPSG:32640, 0.5 m) of real image crops."""
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    images = sorted(Path(data).glob("*/images/*.jpg"))
    if not images:
        raise IdgbrError(f"No Dubai images (*/images/*.jpg) under {data}. Give the dataset folder with --data.")
    cell = min(CELL, size)
    crops = []
    for image_path in images:  # every whole cell of every image, image by image (tiles stay contiguous)
        with Image.open(image_path) as image:
            width, height = image.size
            for top in range(0, height - cell + 1, cell):
                for left in range(0, width - cell + 1, cell):
                    crops.append((image_path, left, top))
    if not crops:
        raise IdgbrError(f"The images under {data} are all smaller than {cell} px; use a smaller --mosaic-size.")
    per_side = -(-size // cell)
    # Spread the picks over the whole list so several dataset tiles (areas of the city) appear.
    picks = [crops[(i * len(crops)) // (per_side * per_side)] for i in range(per_side * per_side)]
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32640", "transform": from_origin(300000, 2800000, 0.5, 0.5), "tiled": True,
               "blockxsize": 256, "blockysize": 256, "compress": "deflate", "photometric": "RGB"}
    with rasterio.open(path, "w", **profile) as dst:
        for n, (image_path, left, top) in enumerate(picks):
            row, col = (n // per_side) * cell, (n % per_side) * cell
            h, w = min(cell, size - row), min(cell, size - col)
            with Image.open(image_path) as image:
                pixels = np.asarray(image.convert("RGB").crop((left, top, left + w, top + h)))
            dst.write(np.moveaxis(pixels, -1, 0), window=rasterio.windows.Window(col, row, w, h))
    return path


def build_large(mosaic: Path, path: Path, size: int, rows_per_write: int = 1024) -> Path:
    """A size x size px raster of tiled copies of ``mosaic``, written band of rows by band of rows."""
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(mosaic) as src:
        period = src.width
        profile = {**src.profile, "width": size, "height": size, "compress": "deflate", "ZLEVEL": 1,
                   "BIGTIFF": "YES"}
        with rasterio.open(path, "w", **profile) as dst:
            for row in range(0, size, rows_per_write):
                height = min(rows_per_write, size - row)
                band = np.empty((3, height, size), np.uint8)
                # Source rows wrap around the mosaic; columns repeat it side by side.
                source_rows = [(row + r) % period for r in range(height)]
                first, last = min(source_rows), max(source_rows)
                chunk = src.read(window=Window(0, first, period, last - first + 1))
                strip = chunk[:, [r - first for r in source_rows], :]
                reps = -(-size // period)
                band[...] = np.tile(strip, (1, 1, reps))[:, :, :size]
                dst.write(band, window=Window(0, row, size, height))
    return path


# ----------------------------------------------------------------------------------------- measuring

def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def child_main(spec: dict) -> dict:
    """Runs inside the child process: one pipeline run (on a local Dask cluster of ``spec["workers"]`` worker
    processes when given, started before the clock runs), then timing and peak memory."""
    import contextlib

    from .pipeline import RunOptions, run

    options = RunOptions(input=Path(spec["input"]), output=Path(spec["output"]), mode=spec["mode"],
                         model=spec.get("model"), steps=spec.get("steps"), device=spec.get("device", "auto"),
                         extent=tuple(spec["extent"]) if spec.get("extent") else None,
                         pixel_size=spec.get("pixel_size"), precision=spec.get("precision"))
    if spec["mode"] == PLAIN_MODE:
        from .bench_reference import run_reference

        plain = run_reference(Path(spec["input"]), Path(spec["output"]), spec["tile"], spec["overlap"],
                              spec["classes"], spec.get("precision"))
        Path(spec["output"]).unlink(missing_ok=True)
        return {**plain, "tiles_refined": 0, "coarse_tiles": plain["tiles"], "device": "cpu",
                "tile_shape": [spec["tile"], spec["tile"]], "peak_rss": _peak_rss_bytes()}
    cluster = None
    if spec.get("workers"):
        from .distributed import Cluster

        cluster = Cluster(workers=int(spec["workers"]))
    with cluster if cluster is not None else contextlib.nullcontext():
        result = run(options, cluster=cluster)
    if not spec.get("keep"):  # kept: the precisions' maps are compared afterwards
        Path(spec["output"]).unlink(missing_ok=True)
    Path(str(spec["output"]) + ".aux.xml").unlink(missing_ok=True)
    return {"seconds": result.seconds, "width": result.width, "height": result.height, "tiles": result.tiles,
            "tiles_refined": result.tiles_refined, "coarse_tiles": result.coarse_tiles,
            "tile_shape": list(result.tile_shape), "steps": result.steps, "device": result.device,
            "coarse_pixel_m": result.coarse_pixel_m, "refine_pixel_m": result.refine_pixel_m,
            "precision": result.precision, "peak_rss": _peak_rss_bytes()}


def measure(spec: dict) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "idgbr.bench", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise IdgbrError(f"A benchmark run failed ({spec['label']}):\n{proc.stderr.strip()[-2000:]}")
    # The 1-minute load average at the end: above the core count, something else shared the CPU.
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1]), "load": load}


# ----------------------------------------------------------------------------------------- report

def machine_summary(device: str) -> dict:
    import torch

    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        mhz = next(float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz"))
        lanes = 16 if " avx512f" in text else 8 if " avx2" in text else 4
        # Two FMA pipes per core, 2 flops per FMA: an upper bound to set achieved GFLOP/s against.
        info["peak_gflops"] = (os.cpu_count() or 1) * mhz / 1000 * 2 * lanes * 2
        info["simd"] = "AVX-512" if lanes == 16 else "AVX2" if lanes == 8 else "SSE"
        info["bf16_units"] = "AMX" if " amx_bf16" in text else "AVX512-BF16" if " avx512_bf16" in text else ""
    except (OSError, StopIteration, ValueError):
        pass
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["ram_gb"] = pages / 1e9
    except (ValueError, OSError, AttributeError):
        pass
    if torch.cuda.is_available() and device in ("auto", "cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_flops(model: str | None, steps: int | None) -> tuple[float | None, float | None, ModelCard]:
    from .model_bundle import load_bundle

    bundle = load_bundle(model, "cpu")
    card = bundle.card
    if not hasattr(bundle, "flops_per_megapixel"):
        return None, None, card
    return bundle.flops_per_megapixel(steps, refine=False), bundle.flops_per_megapixel(steps), card


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f}"


def _rules(card: ModelCard) -> str:
    from .checkpoint import rules_text

    sampler = card.sampler
    return rules_text(sampler.band, sampler.vocabulary, sampler.min_confidence)


def render_report(rows: list[dict], machine: dict, card: ModelCard, flops: tuple[float | None, float | None],
                  settings: dict) -> str:
    seg_flops, full_flops = flops
    if seg_flops is None or full_flops is None:  # both or neither: unknown without a coarse segmenter
        seg_flops = full_flops = None
    lines = ["# Benchmarks", "",
             "Written by `idgbr bench --report docs/BENCHMARKS.md` (`make bench`); rerun it to refresh this file.",
             "", f"- date: {datetime.date.today().isoformat()}",
             f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores"
             + (f" ({machine['simd']}{', ' + machine['bf16_units'] if machine.get('bf16_units') else ''}, estimated "
                f"fp32 peak {machine['peak_gflops']:.0f} GFLOP/s)" if "peak_gflops" in machine else "")
             + (f", {machine['ram_gb']:.0f} GB RAM" if "ram_gb" in machine else "")
             + (f", GPU {machine['gpu']}" if "gpu" in machine else ""),
             f"- software: Python {machine.get('python')}, PyTorch {machine.get('torch')} "
             f"({machine.get('threads')} threads)",
             f"- model: {card.name} (tile {card.tile_size} px, overlap {card.overlap} px, "
             f"sampling steps {settings['steps']}, {_rules(card)})",
             f"- device: {settings['device']}", ""]
    if seg_flops is not None and full_flops is not None:
        lines += [f"Model cost: **{seg_flops / 1e9:.1f} GFLOPs per megapixel** for the coarse segmenter, "
                  f"**{full_flops / 1e9:.1f} GFLOPs per megapixel** for coarse + refiner ({settings['steps']} "
                  "sampling steps), per megapixel the networks see (tile overlap and tiles skipped by the refiner "
                  "change what an output megapixel costs; the achieved GFLOP/s column is the rate the run "
                  "reached).", ""]
    lines += ["| raster | processed | mode | precision | s/MP | MP/s | tiles refined | peak RSS (GB) "
              "| achieved GFLOP/s | load |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mp = r["width"] * r["height"] / 1e6
        s_per_mp = r["seconds"] / mp
        refined = (f"{r['tiles_refined']}/{r['tiles']} ({100 * r['tiles_refined'] / max(1, r['tiles']):.0f} %)"
                   if r["mode"] == "refine" else "-")
        achieved = "-"
        if r["mode"] == PLAIN_MODE and settings.get("plain_flops"):
            area = r["tile_shape"][0] * r["tile_shape"][1] / 1e6
            achieved = f"{r['tiles'] * area * settings['plain_flops'] / r['seconds'] / 1e9:.0f}"
        elif seg_flops is not None and full_flops is not None:
            area = r["tile_shape"][0] * r["tile_shape"][1] / 1e6
            work = r["coarse_tiles"] * area * seg_flops
            if r["mode"] == "refine":
                work += r["tiles_refined"] * area * (full_flops - seg_flops)
            achieved = f"{work / r['seconds'] / 1e9:.0f}"
        mode = "segment" if r["mode"] == PLAIN_MODE else r["mode"]
        lines.append(f"| {r['label']} | {r['width']} x {r['height']} ({mp:.1f} MP) | {mode} | "
                     f"{r.get('precision', 'fp32')} | {s_per_mp:.2f} | {1 / s_per_mp:.2f} | {refined} | "
                     f"{_gb(r['peak_rss'])} | {achieved} | "
                     f"{'n/a' if r.get('load') is None else format(r['load'], '.1f')} |")
    refine_rows = [r for r in rows if r["mode"] == "refine"]
    if refine_rows and not str(settings["device"]).startswith("cpu"):
        lines += ["", f"The targets ({TARGET_S_PER_MP} s/MP, {TARGET_RSS_GB} GB) are for the 2-core CPU; this run "
                  f"used {settings['device']} (peak RSS includes the CUDA libraries)."]
    elif refine_rows:
        lines.append("")
        for precision in dict.fromkeys(r.get("precision", "fp32") for r in rows):
            # The targets are for one process; the Dask rows show scaling and are not held to them.
            own = [r for r in refine_rows if r.get("precision", "fp32") == precision and not r.get("workers")]
            if not own:
                continue
            worst = max(r["seconds"] / (r["width"] * r["height"] / 1e6) for r in own)
            peak = max((r["peak_rss"] or 0) for r in rows if r.get("precision", "fp32") == precision
                       and not r.get("workers") and r["mode"] != PLAIN_MODE)
            lines.append(f"Targets (2-core CPU, default settings) at {precision}: segment + refine <= "
                         f"{TARGET_S_PER_MP} s/MP — measured {worst:.2f} s/MP "
                         f"({'met' if worst <= TARGET_S_PER_MP else 'NOT met'}); peak RSS <= {TARGET_RSS_GB} GB — "
                         f"measured {peak / 1e9:.2f} GB ({'met' if peak <= TARGET_RSS_GB * 1e9 else 'NOT met'}).")
        lines += speed_bar(rows, settings.get("agreement", {}))
    lines += ["", "What is measured:", "",
              "- s/MP: wall time of one `idgbr` run (model loading included, Python start-up excluded) divided "
              "by the output megapixels; each run is a separate child process and peak RSS is that process's "
              "own maximum resident set size (getrusage).",
              f"- mosaic: a {settings['mosaic_size']} x {settings['mosaic_size']} px GeoTIFF of whole "
              f"{CELL} px crops of the Dubai tiles (real imagery; CC0, Humans in the Loop / MBRSC), placeholder "
              "georeference EPSG:32640, 0.5 m.",
              f"- large: a {settings['large_size']} x {settings['large_size']} px 3-band raster of tiled copies "
              "of the mosaic, written block by block. Segment + refine over all of it would take hours on two "
              f"cores, so the run covers a full-width band of {settings['large_rows']} rows (`--extent`): full "
              "width is what sizes the engine's buffers (rows are streamed and dropped), so its peak RSS is "
              "the peak for the whole raster.",
              f"- at 5 cm: the same raster run with `--pixel-size {FINE_PIXEL_M}`, as a drone mosaic would be: "
              "outside the model's range, the coarse segmenter works on a copy resampled (area average, window by "
              "window) to the working resolution and the refiner on one at the finest resolution the model is "
              "valid at; the result is written on the input's grid. s/MP counts the input's megapixels, so "
              "these rows show that the cost follows the working resolution, and the whole-raster row that "
              "the resampled pass streams (its peak RSS stays near the mosaic's).",
              "- precision: the number format of the networks (`--precision`); the refiner's rules, the blending "
              "and the confidence gate are fp32 in every row. Each raster runs at each precision one right after "
              "the other, so the two rows share the machine's conditions.",
              "- load: the machine's 1-minute load average when the run ended; above the number of cores, other "
              "work shared the CPU and the timing is pessimistic.",
              "- tiles refined: tiles whose coarse map has a class boundary go through the refiner; the others "
              "keep their single class.",
              "- on N Dask workers (`--workers LIST`): the same run split into parts of rows on a local Dask "
              "cluster of N worker processes, each with the cores / N torch threads (`idgbr refine --workers N`); "
              "the clock starts once the workers are up (their start and model loading inside the run). Peak RSS "
              "is the writing process's only; each worker holds about one part.",
              "- plain ResNet-34 U-Net (reference): what a user would run instead of IDGBR, a U-Net with a "
              "ResNet-34 encoder (random weights: only its cost counts"
              + (f"; {settings['plain_flops'] / 1e9:.0f} GFLOPs per megapixel" if settings.get("plain_flops") else "")
              + ") over the same mosaic with the same tiles, at the same precision: read, network, arg max, "
              "GeoTIFF written; no blending of overlaps (`idgbr/bench_reference.py`).",
              "- agreement: the share of pixels where the mosaic's refined map at a half precision has the class "
              "of the fp32 map.", ""]
    return "\n".join(lines)


def _mosaic_row(rows: list[dict], mode: str, precision: str) -> dict | None:
    return next((r for r in rows if r["label"] == "mosaic" and r["mode"] == mode and not r.get("workers")
                 and r.get("precision", "fp32") == precision), None)


def speed_bar(rows: list[dict], agreement: dict[str, float]) -> list[str]:
    """Lines on the bar against the plain segmenter and between precisions, for the rows this run has."""
    lines = []
    for plain in (r for r in rows if r["mode"] == PLAIN_MODE):
        precision = plain.get("precision", "fp32")
        ours = _mosaic_row(rows, "refine", precision)
        if ours is None:
            continue
        ratio = ours["seconds"] / plain["seconds"]
        s_per_mp = ours["seconds"] / (ours["width"] * ours["height"] / 1e6)
        lines.append(f"Against the plain segmenter at {precision}: segment + refine takes **{ratio:.2f}×** the plain "
                     f"ResNet-34 U-Net's time (target <= {TARGET_PLAIN_RATIO}: "
                     f"{'met' if ratio <= TARGET_PLAIN_RATIO else 'NOT met'}) and {s_per_mp:.2f} s/MP (target <= "
                     f"{TARGET_FAST_S_PER_MP}: {'met' if s_per_mp <= TARGET_FAST_S_PER_MP else 'NOT met'}).")
    base = _mosaic_row(rows, "refine", "fp32")
    for precision, share in agreement.items():
        half = _mosaic_row(rows, "refine", precision)
        if base is None or half is None:
            continue
        speedup = base["seconds"] / half["seconds"]
        lines.append(f"{precision} against fp32 (segment + refine on the mosaic): **{speedup:.2f}× faster** (target >= "
                     f"{TARGET_HALF_SPEEDUP}×: {'met' if speedup >= TARGET_HALF_SPEEDUP else 'NOT met'}), "
                     f"**{100 * share:.2f} %** of pixels agree (target >= {100 * TARGET_HALF_AGREEMENT:.1f} %: "
                     f"{'met' if share >= TARGET_HALF_AGREEMENT else 'NOT met'}).")
    return [""] + lines if lines else []


def pixel_agreement(a: Path, b: Path) -> float:
    """The share of pixels with the same class in two class maps of one grid, read block by block."""
    import rasterio

    same = total = 0
    with rasterio.open(a) as first, rasterio.open(b) as second:
        for _, window in first.block_windows(1):
            x, y = first.read(1, window=window), second.read(1, window=window)
            same += int(np.count_nonzero(x == y))
            total += x.size
    return same / max(1, total)


def write_report(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    from .raster.io import FILE_MODE

    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- command

def bench_precisions(text: str, device: str) -> list[str]:
    """The precisions of a --precision list ("fp32,auto") as runs on ``device`` use them, each once."""
    from .model_bundle import select_device
    from .precision import resolve_precision

    where = select_device(device)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise IdgbrError("--precision needs at least one of auto, fp32, bf16, fp16 (e.g. fp32,bf16).")
    return list(dict.fromkeys(resolve_precision(name, where) for name in names))


def bench_workers(text: str | None) -> list[int]:
    """The worker counts of --workers ("1,2"); none without it."""
    if not text:
        return []
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise IdgbrError(f"--workers must be worker counts such as 1,2 (got {text!r}).") from None
    if not counts or min(counts) < 1:
        raise IdgbrError(f"--workers must be worker counts of at least 1, such as 1,2 (got {text!r}).")
    return counts


def run_bench(args: argparse.Namespace) -> int:
    data = Path(args.data)
    if not data.is_dir():
        raise IdgbrError(f"Dataset folder not found: {data}. Give the Dubai tiles with --data.")
    if args.mosaic_size * args.mosaic_size < 16e6 and not args.small:
        raise IdgbrError("--mosaic-size below 4000 px is under 16 MP; add --small to allow it (wiring tests).")
    seg_flops, full_flops, card = model_flops(args.model, args.steps)
    steps = args.steps or card.sampler.steps
    precisions = bench_precisions(args.precision, args.device)
    worker_counts = bench_workers(args.workers)
    machine = machine_summary(args.device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="idgbr-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        say = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
        say(f"building the {args.mosaic_size} px mosaic from {data} ...")
        mosaic = build_mosaic(data, work / "mosaic.tif", args.mosaic_size)
        base = {"model": args.model, "steps": args.steps, "device": args.device}
        plans: list[tuple[str, Path, str, list[float] | None, float | None]] = [
                 ("mosaic", mosaic, "segment", None, None), ("mosaic", mosaic, "refine", None, None),
                 # The same pixels taken for 5 cm ones: the model works on a resampled copy, so the
                 # cost follows the working resolution, not the input's megapixels.
                 (FINE_LABEL.format(where="mosaic"), mosaic, "segment", None, FINE_PIXEL_M),
                 (FINE_LABEL.format(where="mosaic"), mosaic, "refine", None, FINE_PIXEL_M)]
        if not args.skip_large:
            say(f"building the {args.large_size} px raster ...")
            large = build_large(mosaic, work / "large.tif", args.large_size)
            import rasterio

            with rasterio.open(large) as src:
                top = (src.height - args.large_rows) // 2
                b = src.bounds
                res = src.res[1]
                band_extent = [b.left, b.top - (top + args.large_rows) * res, b.right, b.top - top * res]
            plans.append(("large (full-width band)", large, "refine", band_extent, None))
            # All of it at 5 cm: the resampled coarse pass streams, so its peak RSS stays that of the mosaic's.
            plans.append((FINE_LABEL.format(where="large, whole raster"), large, "segment", None, FINE_PIXEL_M))
        from .model_bundle import select_device

        if select_device(args.device).type == "cpu":  # the reference runs on the CPU only
            plans.insert(2, (PLAIN_LABEL, mosaic, PLAIN_MODE, None, None))
        runs: list[tuple[str, Path, str, list[float] | None, float | None, str, int | None]] = [
            (label, raster, mode, extent, pixel_size, precision, None)
            for label, raster, mode, extent, pixel_size in plans for precision in precisions]
        # Scaling: the mosaic's refine at the first precision on local Dask clusters of each size asked for.
        runs += [(f"mosaic on {n} Dask worker{'s' if n != 1 else ''}", mosaic, "refine", None, None, precisions[0], n)
                 for n in worker_counts]
        for label, raster, mode, extent, pixel_size, precision, workers in runs:
            say(f"running {mode} on {label} at {precision} ...")
            keep = label == "mosaic" and mode == "refine" and not workers
            output = work / (f"refined_{precision}.tif" if keep else "out.tif")
            spec = {**base, "label": label, "input": str(raster), "output": str(output), "mode": mode,
                    "extent": extent, "pixel_size": pixel_size, "precision": precision, "workers": workers,
                    "keep": keep, "tile": card.tile_size, "overlap": card.overlap, "classes": card.num_classes}
            row = measure(spec)
            rows.append(row)
            say(f"  {row['width']} x {row['height']} px: {row['seconds']:.1f} s, peak RSS {_gb(row['peak_rss'])} GB")
        agreement = {p: pixel_agreement(work / "refined_fp32.tif", work / f"refined_{p}.tif")
                     for p in precisions if p != "fp32" and (work / f"refined_{p}.tif").is_file()
                     and (work / "refined_fp32.tif").is_file()}
    from .bench_reference import reference_flops_per_mp

    settings = {"steps": steps, "device": rows[0]["device"] if rows else args.device,
                "agreement": agreement, "plain_flops": reference_flops_per_mp(card.tile_size, card.num_classes),
                "mosaic_size": args.mosaic_size, "large_size": args.large_size, "large_rows": args.large_rows}
    text = render_report(rows, machine, card, (seg_flops, full_flops), settings)
    if args.report:
        report = Path(args.report)
        old = report.read_text(encoding="utf-8") if report.is_file() else ""
        if KEEP_MARKER in old:  # results from other machines (e.g. a GPU run) stay in the file
            text = text.rstrip("\n") + "\n\n" + old[old.index(KEEP_MARKER):]
        write_report(report, text)
    if not args.quiet:
        print(text)
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="measure s/MP and peak memory on a real >= 16 MP mosaic and a 20,000 px raster",
        description="Build a real mosaic (>= 16 MP) from the Dubai tiles and a large raster of its copies in a "
                    "temporary folder, run segment-only and segment + refine, and report seconds per megapixel, "
                    "the share of tiles refined, peak memory and the model's GFLOPs per megapixel.")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help=f"Dubai dataset folder with tile*/images/*.jpg (default {DEFAULT_DATA})")
    parser.add_argument("--report", type=Path, help="write the Markdown report here (e.g. docs/BENCHMARKS.md)")
    parser.add_argument("--model", help="model file or bundled name (default dubai5)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model card's)")
    parser.add_argument("--precision", default=DEFAULT_PRECISIONS, metavar="LIST",
                        help="comma-separated precisions of the networks to measure, each raster at each "
                             f"(auto, fp32, bf16, fp16; default {DEFAULT_PRECISIONS}: auto is bf16 on CPUs with "
                             "AMX or AVX512-BF16, a half type on GPUs, else fp32, which then runs once)")
    parser.add_argument("--mosaic-size", type=int, default=4096, help="mosaic side in px (default 4096: 16.8 MP)")
    parser.add_argument("--large-size", type=int, default=20000, help="large raster side in px (default 20000)")
    parser.add_argument("--large-rows", type=int, default=1024,
                        help="rows of the full-width band refined on the large raster (default 1024)")
    parser.add_argument("--skip-large", action="store_true", help="only the mosaic")
    parser.add_argument("--small", action="store_true", help="allow a mosaic under 16 MP (quick wiring checks)")
    parser.add_argument("--workers", metavar="LIST",
                        help="also refine the mosaic on local Dask clusters of these sizes, e.g. 1,2: how the "
                             "run scales with worker processes (needs pip install 'idgbr[distributed]')")
    parser.add_argument("--workdir", type=Path, help="folder for the temporary rasters (default: system temp)")
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.set_defaults(func=run_bench)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_main(json.loads(sys.argv[2]))))
        sys.exit(0)
    # Only this subcommand, so the benchmark also runs where the service's or trainer's extras are missing.
    top = argparse.ArgumentParser(prog="python -m idgbr.bench")
    register_cli(top.add_subparsers(dest="command", required=True))
    parsed = top.parse_args(["bench", *sys.argv[1:]])
    try:
        sys.exit(parsed.func(parsed))
    except IdgbrError as exc:
        print(f"idgbr: error: {exc}", file=sys.stderr)
        sys.exit(1)
