"""Validation at the user's resolution: drone tiles at their native ~5 cm, run through the whole pipeline as a
user would run them (`idgbr segment`, `idgbr refine --coarse`), so the resolution plan (coarse pass at the
working resolution, refiner at the finest resolution the model is valid at, output on the input's grid) is
what gets scored.

    python -m idgbr.validate_native --model buildings2 --accra ../shared/datasets/accra-buildings \\
        --json docs/validation/buildings2_native.json

Each Accra `val/` tile (never used in training) is written as a GeoTIFF in UTM zone 30N with a 0.05 m pixel.
Scored against the human masks on the input's grid:
- the bundled segmenter's map (`segment`);
- the same map refined (`refine --coarse` with that map);
- blocky maps (24-px blocks of the truth, about 1.2 m, as from a low-resolution model) refined, beside the
  classical superpixel refiner on the same maps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from .classical import superpixel_refine
from .data import load_accra
from .metrics import Scores
from .model_bundle import load_bundle
from .pipeline import RunOptions, run
from .validate import blocky_map

NATIVE_PIXEL_M = 0.05  # the Accra drone mosaic's ground sample distance
UTM_30N = "EPSG:32630"  # Accra lies in UTM zone 30 north
ORIGIN = (800_000.0, 620_000.0)  # a plausible corner of the mosaic in UTM 30N (metres)
BLOCK_PX = 24


def write_tile(path: Path, array: np.ndarray, row: int, col: int, pixel_m: float) -> None:
    """(H, W, 3) image or (H, W) ids as a GeoTIFF placed at the tile's position in the mosaic."""
    bands = array.transpose(2, 0, 1) if array.ndim == 3 else array[None]
    transform = from_origin(ORIGIN[0] + col * pixel_m, ORIGIN[1] - row * pixel_m, pixel_m, pixel_m)
    with rasterio.open(path, "w", driver="GTiff", width=bands.shape[2], height=bands.shape[1], count=bands.shape[0],
                       dtype="uint8", crs=UTM_30N, transform=transform) as dst:
        dst.write(bands)


def read_ids(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _position(name: str) -> tuple[int, int]:
    """'accra/val/r20480_c11264@1' -> (20480, 11264), the tile's offset in the mosaic in native pixels."""
    stem = name.split("/")[-1].split("@")[0]
    row, col = stem.split("_")
    return int(row[1:]), int(col[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idgbr.validate_native", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="buildings2", help="a bundled model's name or a model file")
    parser.add_argument("--accra", type=Path, default=Path("../shared/datasets/accra-buildings"))
    parser.add_argument("--max-images", type=int, default=0, help="quick check: only this many tiles")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    card = load_bundle(args.model, "cpu").card
    k = card.num_classes
    names = [c.name for c in card.classes]
    scenes = load_accra(args.accra, "val", 1, args.max_images)
    sources = ("segmenter", "blocky")
    methods = ("coarse", "refined", "classical")
    scores = {(s, m): Scores(k, names) for s in sources for m in methods}
    notes: set[str] = set()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        image_path, truth_blocky = folder / "image.tif", folder / "blocky.tif"
        for i, scene in enumerate(scenes):
            row, col = _position(scene.name)
            write_tile(image_path, scene.image, row, col, NATIVE_PIXEL_M)
            segmented = folder / "segmented.tif"
            result = run(RunOptions(input=image_path, output=segmented, mode="segment", model=args.model,
                                    device="cpu"))
            notes.update(n for n in result.notes if n.startswith("INPUT is"))
            coarse = {"segmenter": read_ids(segmented), "blocky": blocky_map(scene.labels, k, BLOCK_PX)}
            write_tile(truth_blocky, coarse["blocky"], row, col, NATIVE_PIXEL_M)
            for source, path in (("segmenter", segmented), ("blocky", truth_blocky)):
                refined = folder / f"refined_{source}.tif"
                result = run(RunOptions(input=image_path, output=refined, mode="refine", coarse=path,
                                        model=args.model, device="cpu"))
                notes.update(n for n in result.notes if n.startswith("INPUT is"))
                maps = {"coarse": coarse[source], "refined": read_ids(refined),
                        "classical": superpixel_refine(scene.image, coarse[source], k)}
                for method, pred in maps.items():
                    scores[(source, method)].add(pred, scene.labels, coarse[source])
            if (i + 1) % 10 == 0 or i + 1 == len(scenes):
                print(f"{i + 1}/{len(scenes)} tiles, {time.monotonic() - started:.0f}s", flush=True)
    results: dict = {"model": card.name, "images": len(scenes), "pixel_size_m": NATIVE_PIXEL_M,
                     "block_px": BLOCK_PX, "notes": sorted(notes),
                     "minutes": round((time.monotonic() - started) / 60, 1),
                     "results": {}}
    labels = {"segmenter": "bundled segmenter", "blocky": f"blocky ({BLOCK_PX}-px blocks)"}
    for source in sources:
        base = scores[(source, "coarse")].result()
        rows = {"coarse": base}
        for method in ("refined", "classical"):
            rows[method] = scores[(source, method)].result()
            for key in ("boundary_f", "boundary_iou", "miou"):
                rows[method][f"delta_{key}"] = round(rows[method][key] - base[key], 4)
        results["results"][labels[source]] = rows
        print(f"{labels[source]}: mIoU {base['miou']:.3f} BF {base['boundary_f']:.3f}; refined "
              f"dBF {rows['refined']['delta_boundary_f']:+.3f} dmIoU {rows['refined']['delta_miou']:+.3f}; "
              f"classical dBF {rows['classical']['delta_boundary_f']:+.3f} "
              f"dmIoU {rows['classical']['delta_miou']:+.3f}", flush=True)
    for note in sorted(notes):
        print(note)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
