"""Map quality against tile size, through the whole pipeline as a user runs it (`idgbr segment` / `idgbr refine`
with the model's defaults), on the held-out Dubai tile 8 scored against its labels.

The networks normalise each tile (group norm) and see only the tile's context, so the tile size is a
quality choice as well as a speed one. `python -m idgbr.validate` refines whole images at once; this
study checks what the engine's tiles give.

    .venv/bin/python tools/tile_study.py --model dubai5 --tiles 512,1024 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from idgbr.checkpoint import read_card
from idgbr.data import load_scenes
from idgbr.metrics import Scores
from idgbr.model_bundle import resolve_model_path
from idgbr.validate import binary_task
from idgbr.validate_native import read_ids, write_tile

DUBAI_PIXEL_M = 0.5  # the Dubai imagery's nominal resolution: the grid the placeholder GeoTIFFs get


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dubai5")
    parser.add_argument("--tiles", default="512,1024", help="tile sizes to compare (--tile of the runs)")
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    card = read_card(resolve_model_path(args.model))
    scenes = load_scenes(args.data, ["tile8"], binary_task(card) or "multiclass")
    k = card.num_classes
    idgbr = str(Path(sys.executable).with_name("idgbr"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for i, scene in enumerate(scenes):
            write_tile(folder / f"{i}.tif", scene.image, 0, 0, DUBAI_PIXEL_M)
        for tile in [int(t) for t in args.tiles.split(",")]:
            for mode in ("segment", "refine"):
                scores = Scores(k)
                for i, scene in enumerate(scenes):
                    out = folder / f"{i}_{mode}_{tile}.tif"
                    subprocess.run([idgbr, mode, str(folder / f"{i}.tif"), "-o", str(out), "-q", "--tile", str(tile),
                                    "--model", args.model], check=True)
                    scores.add(read_ids(out), scene.labels)
                r = scores.result()
                results[f"{mode}, tile {tile}"] = {m: round(r[m], 4) for m in ("miou", "boundary_f", "boundary_iou")}
                print(f"{args.model} {mode}, tile {tile}: {results[f'{mode}, tile {tile}']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "images": len(scenes), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
