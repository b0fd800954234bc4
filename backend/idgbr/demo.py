"""`python -m idgbr.demo --out out` (what `make demo` runs): refine the bundled sample raster with the bundled
model and draw a preview, image | coarse | refined, with a class legend.

Writes OUT/demo_coarse.tif (the coarse segmenter alone), OUT/demo_refined.tif (the coarse map refined by
the diffusion refiner: the product's result) and OUT/demo_preview.png.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .classes import hex_to_rgb
from .errors import IdgbrError
from .limits import DEVICES
from .raster.io import FILE_MODE

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "resources" / "sample" / "dubai_sample.tif"
PANEL = 480  # px per preview panel side
NODATA_RGB = (64, 64, 64)


def colorize(ids: np.ndarray, classes: list[dict]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in the model's class colours; nodata and unknown ids dark grey."""
    lut = np.tile(np.array(NODATA_RGB, np.uint8), (256, 1))
    for c in classes:
        lut[int(c["id"])] = hex_to_rgb(c["color"])
    return lut[ids]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def render_preview(image: np.ndarray, coarse: np.ndarray, refined: np.ndarray, classes: list[dict],
                   titles: tuple[str, str, str] = ("image", "coarse (segmenter)", "refined (diffusion)"),
                   panel: int = PANEL):
    """Three panels side by side with titles and a legend; returns a Pillow image."""
    from PIL import Image, ImageDraw

    height, width = coarse.shape
    scale = panel / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    panels = [Image.fromarray(image).resize(size, Image.Resampling.LANCZOS),
              Image.fromarray(colorize(coarse, classes)).resize(size, Image.Resampling.NEAREST),
              Image.fromarray(colorize(refined, classes)).resize(size, Image.Resampling.NEAREST)]
    gap, title_h, legend_h = 12, 30, 40
    canvas = Image.new("RGB", (3 * size[0] + 4 * gap, title_h + size[1] + legend_h + gap), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(16)
    for n, (tile, title) in enumerate(zip(panels, titles)):
        x = gap + n * (size[0] + gap)
        canvas.paste(tile, (x, title_h))
        draw.text((x, 6), title, fill="black", font=font)
    x, y = gap, title_h + size[1] + 12
    for c in classes:
        draw.rectangle((x, y, x + 18, y + 18), fill=hex_to_rgb(c["color"]), outline="black")
        label = str(c["name"])
        draw.text((x + 24, y + 1), label, fill="black", font=font)
        x += 24 + int(draw.textlength(label, font=font)) + 20
    return canvas


def _read_rgb(path: Path, bands: list[int]) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        data = src.read(bands)
    if data.dtype != np.uint8:  # a preview only: a simple 2-98 % stretch
        lo, hi = np.percentile(data, [2, 98])
        data = np.clip((data.astype(np.float32) - lo) * 255.0 / max(hi - lo, 1e-6), 0, 255).astype(np.uint8)
    return np.moveaxis(data, 0, -1)


def _read_ids(path: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1)


def run_demo(out: Path, input_path: Path = SAMPLE, model: str | None = None, steps: int | None = None,
             device: str = "auto", quiet: bool = False) -> tuple[Path, Path]:
    from .pipeline import RunOptions, run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda text: None) if quiet else (lambda text: print(f"demo: {text}", flush=True))
    coarse_path, refined_path = out / "demo_coarse.tif", out / "demo_refined.tif"
    say(f"coarse segmentation of {input_path.name} ...")
    coarse = run(RunOptions(input=input_path, output=coarse_path, mode="segment", model=model, device=device))
    say(f"  {coarse.seconds:.1f} s")
    # Refine the coarse map just written (the --coarse path), so the coarse pass is not run twice.
    say("diffusion refinement of the class boundaries ...")
    refined = run(RunOptions(input=input_path, output=refined_path, mode="refine", coarse=coarse_path,
                             model=model, steps=steps, device=device))
    say(f"  {refined.seconds:.1f} s, refined {refined.tiles_refined} of {refined.tiles} tiles")
    bands = [1, 2, 3]
    preview = render_preview(_read_rgb(input_path, bands), _read_ids(coarse_path), _read_ids(refined_path),
                             refined.classes)
    preview_path = out / "demo_preview.png"
    handle, tmp = tempfile.mkstemp(prefix=".demo_preview.", suffix=".png", dir=out)
    os.close(handle)
    try:
        preview.save(tmp, format="PNG")
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, preview_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    say(f"wrote {refined_path} and {preview_path}")
    return refined_path, preview_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idgbr.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder (default: out)")
    parser.add_argument("--input", type=Path, default=SAMPLE, help="raster to refine (default: the bundled sample)")
    parser.add_argument("--model", help="model file or bundled name (default dubai5)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model card's)")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="idgbr: %(message)s")
    try:
        run_demo(args.out, args.input, args.model, args.steps, args.device, args.quiet)
    except IdgbrError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo: interrupted.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
