"""Validation on the held-out Dubai tile: picks the sampler defaults, writes the model card's metrics and
the table and figure of docs/MODEL_CARD.md.

    python -m idgbr.validate --model resources/models/dubai5.safetensors --data ../shared/datasets/dubai-aerial

Coarse maps come from different discriminative models: the bundled CNN segmenter, a second CNN of a
different architecture (a plain FCN, `idgbr train coarse --architecture fcn`) and a classical
gradient-boosted pixel classifier. Each is refined by the diffusion refiner (one step = the one-shot
refiner of the same network, and N steps) and by a classical superpixel refiner.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, save_checkpoint
from .classes import IGNORE_ID
from .classical import PixelClassifier, superpixel_refine
from .data import Scene, load_scenes
from .metrics import Scores
from .model_bundle import ModelBundle, build_bundle, select_device
from .models.diffusion import guard_band_mask
from .train import predict_scene

STEP_CHOICES = (1, 2, 3, 4)
GUARD_CHOICES = (0, 4, 8, 16)
STEP_TOLERANCE = 0.01


def _pad(tensor: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int, int]:
    height, width = tensor.shape[-2:]
    return F.pad(tensor, (0, (-width) % multiple, 0, (-height) % multiple), mode="reflect"), height, width


def refine_scene(bundle: ModelBundle, image: np.ndarray, coarse: np.ndarray, steps: int, guard_band: int = 0,
                 strength: float = 1.0, seed: int = 0) -> np.ndarray:
    padded, height, width = _pad(bundle.normalize(image.transpose(2, 0, 1)), bundle.card["size_multiple"])
    coarse_t = torch.from_numpy(coarse.astype(np.int64))[None, None].float()
    coarse_t = F.pad(coarse_t, (0, padded.shape[-1] - width, 0, padded.shape[-2] - height), mode="replicate")
    logits = bundle.refine(padded, coarse_t[:, 0].long(), [(0, 0)], steps=steps, guard_band=guard_band,
                           strength=strength, seed=seed)
    return logits[0, :, :height, :width].argmax(0).byte().cpu().numpy()


def guarded(refined: np.ndarray, coarse: np.ndarray, band: int) -> np.ndarray:
    """The refined map with the guard band applied afterwards (the same map as refining with it on)."""
    if band <= 0:
        return refined
    inside = guard_band_mask(torch.from_numpy(coarse.astype(np.int64))[None], band)[0].numpy()
    return np.where(inside, refined, coarse)


def score_all(preds: list[np.ndarray], scenes: list[Scene], k: int, names: list[str],
              coarse: list[np.ndarray] | None = None) -> dict:
    scores = Scores(k, names)
    for i, scene in enumerate(scenes):
        scores.add(preds[i], scene.labels, None if coarse is None else coarse[i])
    return scores.result()


def _gain(result: dict, base: dict) -> float:
    """Selection score: boundary gains, with mIoU losses counted three times (semantics must not suffer)."""
    d_bf = result["boundary_f"] - base["boundary_f"]
    d_biou = result["boundary_iou"] - base["boundary_iou"]
    d_miou = result["miou"] - base["miou"]
    return d_bf + d_biou + 2 * min(0.0, d_miou) + d_miou


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m idgbr.validate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/dubai-aerial"))
    parser.add_argument("--tile", default="tile8", help="held-out tile")
    parser.add_argument("--select-parts", default="1,2,3", help="parts of the tile used to pick the defaults")
    parser.add_argument("--max-images", type=int, default=0, help="quick check: score only this many images")
    parser.add_argument("--second-model", type=Path,
                        help="a coarse model of another architecture (e.g. the FCN) whose maps are refined too")
    parser.add_argument("--classifier-tiles", default="tile1,tile2,tile3,tile4,tile5,tile6")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--figure", type=Path, help="PNG of image / coarse / refined / truth crops")
    parser.add_argument("--no-update", action="store_true", help="do not write defaults and metrics into the model")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    tensors, card = load_checkpoint(args.model)
    bundle = build_bundle(tensors, card, select_device("auto"), args.model)
    k, task = card["num_classes"], card["task"]
    names = [c["name"] for c in card["classes"]]
    scenes = load_scenes(args.data, [args.tile], task)
    if args.max_images:
        scenes = scenes[: args.max_images]
    select_names = {f"{args.tile}/image_part_{int(p):03d}" for p in args.select_parts.split(",")}
    selection = [i for i, s in enumerate(scenes) if s.name in select_names] or [0]
    print(f"{len(scenes)} validation images, {sum(s.labels.size for s in scenes) / 1e6:.1f} MP; "
          f"defaults chosen on {len(selection)} of them", flush=True)

    classifier = PixelClassifier(seed=0).fit(
        *zip(*[(s.image, s.labels) for s in load_scenes(args.data, args.classifier_tiles.split(","), task)]))
    sources = {"bundled CNN segmenter": [predict_scene(bundle, s, task) for s in scenes]}
    if args.second_model:
        second = build_bundle(*load_checkpoint(args.second_model), select_device("auto"), args.second_model)
        sources["FCN (second CNN architecture)"] = [predict_scene(second, s, task) for s in scenes]
    sources["pixel classifier (gradient boosting)"] = [classifier.predict(s.image) for s in scenes]
    print(f"coarse maps ready ({time.monotonic() - started:.0f}s)", flush=True)

    # 1. Pick steps and guard band on the selection images, over both coarse sources. The guard band only
    #    masks the result, so each step count is sampled once and every band is scored from that map.
    sel_scenes = [scenes[i] for i in selection]
    sweep: dict[str, float] = {}
    gains: dict[tuple[int, int], list[float]] = {(st, g): [] for st in STEP_CHOICES for g in GUARD_CHOICES}
    for coarse in sources.values():
        sel_coarse = [coarse[i] for i in selection]
        base = score_all(sel_coarse, sel_scenes, k, names)
        for steps in STEP_CHOICES:
            refined = [refine_scene(bundle, s.image, c, steps) for s, c in zip(sel_scenes, sel_coarse)]
            for guard in GUARD_CHOICES:
                maps = [guarded(r, c, guard) for r, c in zip(refined, sel_coarse)]
                gains[steps, guard].append(_gain(score_all(maps, sel_scenes, k, names), base))
    score = {sg: round(float(np.mean(values)), 4) for sg, values in gains.items()}
    for (steps, guard), value in score.items():
        sweep[f"steps={steps} guard={guard}"] = value
        print(f"  select steps={steps} guard={guard}: gain {value:+.4f}", flush=True)
    # Each extra step costs about 20 GFLOP/MP (a quarter more time on a 2-core CPU), so the default is the fewest
    # steps whose best score is within STEP_TOLERANCE of the overall best; then the best band for that count.
    best = max(score.values())
    best_steps = min(st for (st, _), value in score.items() if value >= best - STEP_TOLERANCE)
    guard_default = max(GUARD_CHOICES, key=lambda g: (score[best_steps, g], g > 0))
    print(f"defaults: steps={best_steps} guard_band={guard_default}", flush=True)

    # 2. Score everything on the whole tile, and apart on the images the selection never looked at.
    unseen = [i for i in range(len(scenes)) if i not in selection]
    results: dict[str, dict] = {}
    results_unseen: dict[str, dict] = {}
    for source, coarse in sources.items():
        maps = {"coarse (input)": coarse,
                "classical: SLIC superpixels + coarse majority": [superpixel_refine(s.image, c, k)
                                                                   for s, c in zip(scenes, coarse)]}
        # The one-shot refiner beside the default; when one step is the default, the most steps beside it.
        more_steps = best_steps if best_steps > 1 else STEP_CHOICES[-1]
        one_shot_label = "IDGBR 1 step (default, one-shot)" if best_steps == 1 else "IDGBR one-shot (1 step)"
        more_label = f"IDGBR {more_steps} steps" + (" (default)" if best_steps > 1 else "")
        maps[one_shot_label] = [refine_scene(bundle, s.image, c, 1, guard_default) for s, c in zip(scenes, coarse)]
        maps[more_label] = [refine_scene(bundle, s.image, c, more_steps, guard_default) for s, c in zip(scenes, coarse)]
        results[source] = {row: score_all(m, scenes, k, names, coarse) for row, m in maps.items()}
        results_unseen[source] = {row: score_all([m[i] for i in unseen], [scenes[i] for i in unseen], k, names,
                                                 [coarse[i] for i in unseen]) for row, m in maps.items()}
        print(f"scored {source} ({time.monotonic() - started:.0f}s)", flush=True)

    megapixels = round(sum(s.labels.size for s in scenes) / 1e6, 1)
    summary = {"tile": args.tile, "images": len(scenes), "megapixels": megapixels,
               "selection_images": sorted(select_names), "selection_sweep": sweep, "step_tolerance": STEP_TOLERANCE,
               "results": results, "results_outside_selection": results_unseen}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if args.figure:
        draw_figure(args.figure, scenes, sources["bundled CNN segmenter"], bundle, best_steps, guard_default, card)
    if not args.no_update:
        card["sampler"].update(steps=best_steps, guard_band=guard_default)
        card["metrics"] = {"validation": {k_: v for k_, v in summary.items() if not k_.startswith("results")},
                           **{src: {row: {m: r[m] for m in ("miou", "boundary_f", "boundary_iou", "iou_imp")}
                                    for row, r in rows.items()} for src, rows in results.items()}}
        save_checkpoint(args.model, tensors, card)
        print(f"updated sampler defaults and metrics in {args.model}")
    print(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def draw_figure(path: Path, scenes: list[Scene], coarse: list[np.ndarray], bundle: ModelBundle, steps: int,
                guard: int, card: dict, crop: int = 320, count: int = 3) -> None:
    """Rows of image | coarse | refined | truth crops, class colours with black class boundaries."""
    from PIL import Image, ImageDraw

    from .classes import hex_to_rgb

    palette = np.zeros((256, 3), np.uint8)
    for c in card["classes"]:
        palette[c["id"]] = hex_to_rgb(c["color"])
    palette[IGNORE_ID] = (155, 155, 155)

    def paint(ids: np.ndarray) -> np.ndarray:
        rgb = palette[ids].copy()
        edge = np.zeros(ids.shape, bool)
        edge[1:] |= ids[1:] != ids[:-1]
        edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
        rgb[edge] = 0
        return rgb

    rng = np.random.default_rng(3)
    rows = []
    for index in rng.choice(len(scenes), size=min(count, len(scenes)), replace=False):
        scene = scenes[index]
        height, width = scene.labels.shape
        r, c = rng.integers(0, height - crop), rng.integers(0, width - crop)
        window = (slice(r, r + crop), slice(c, c + crop))
        image = scene.image[window]
        refined = refine_scene(bundle, image, coarse[index][window], steps, guard)
        tiles = [image, paint(coarse[index][window]), paint(refined), paint(scene.labels[window])]
        rows.append(np.concatenate([np.pad(t, ((4, 4), (4, 4), (0, 0)), constant_values=255) for t in tiles], 1))
    grid = np.concatenate(rows, 0)
    header = 28
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, title in enumerate(["image", "coarse (CNN)", f"IDGBR refined ({steps} steps)", "truth"]):
        draw.text((i * (crop + 8) + 10, 8), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


if __name__ == "__main__":
    raise SystemExit(main())
