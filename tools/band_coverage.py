"""How much of a map the refiner could skip: the share of pixels inside the guard band (the only pixels it
may change) and the share of square cells that hold any of them, per bundled model, on the held-out Dubai
tile 8 with each model's own coarse maps and sampler band.

A cell without band pixels could skip the refiner, but the networks need context around the cells they
refine, so skipping parts of a tile only pays when most cells are empty.

    .venv/bin/python tools/band_coverage.py [--cells 128,256,768] [--max-images 9]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from idgbr.checkpoint import load_checkpoint
from idgbr.data import load_scenes
from idgbr.model_bundle import build_bundle, resolve_model_path
from idgbr.models.constraints import guard_band_mask
from idgbr.train import predict_scene
from idgbr.validate import binary_task


def cell_share(mask: np.ndarray, cell: int) -> tuple[int, int]:
    """(cells holding a band pixel, cells) over the whole cells of ``mask``."""
    rows, cols = mask.shape[0] // cell, mask.shape[1] // cell
    cells = mask[: rows * cell, : cols * cell].reshape(rows, cell, cols, cell).any(axis=(1, 3))
    return int(cells.sum()), int(cells.size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"))
    parser.add_argument("--models", default="dubai5,roads2,buildings2")
    parser.add_argument("--cells", default="128,256,768")
    parser.add_argument("--max-images", type=int, default=0)
    args = parser.parse_args()
    cell_sizes = [int(c) for c in args.cells.split(",")]
    print(f"| model | band (px) | pixels in band | {' | '.join(f'{c}-px cells with band' for c in cell_sizes)} |")
    print(f"|---|---|---|{'---|' * len(cell_sizes)}")
    for name in args.models.split(","):
        path = resolve_model_path(name)
        tensors, card = load_checkpoint(path)
        bundle = build_bundle(tensors, card, torch.device("cpu"), path)
        task = binary_task(card) or "multiclass"
        scenes = load_scenes(args.data, ["tile8"], task)[: args.max_images or None]
        in_band = total = 0
        cells = {c: [0, 0] for c in cell_sizes}
        for scene in scenes:
            ids = torch.from_numpy(predict_scene(bundle, scene, task).astype(np.int64))[None]
            mask = guard_band_mask(ids, card.sampler.band)[0].numpy()
            in_band, total = in_band + int(mask.sum()), total + mask.size
            for c in cell_sizes:
                hit, count = cell_share(mask, c)
                cells[c][0] += hit
                cells[c][1] += count
        shares = " | ".join(f"{hit / count:.1%}" for hit, count in cells.values())
        print(f"| {name} | {card.sampler.band} | {in_band / total:.1%} | {shares} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
